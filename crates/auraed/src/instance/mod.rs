//! Spawned instances: a new auraed started by this one, with its own short-lived SPIFFE
//! identity, reached with the same mTLS API.
//!
//! `Spawn` is synchronous: it returns when the child answers health over mTLS *and*
//! presents exactly the SPIFFE ID minted for it (`/instance/<our signer's path>/<name>`).
//! A cell-isolated instance is auraed re-executed from our sealed copy as the init of a
//! new cell (see [`child`]): every namespace new, its own cgroup subtree under
//! `instances/<name>` (delegated: it makes its own cells there), a veth pair to our bridge
//! with an address leased from it, its identity and policy handed over in a sealed memfd
//! ([`handover`]). Its SVID is renewed by the child through `Instances/Renew` before it
//! expires ([`renew`]).

pub mod child;
pub mod handover;
pub mod identity;
pub mod initramfs;
pub mod record;
pub mod renew;
pub mod spec;
pub mod template;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
    path::PathBuf,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use aurae_identity::SpiffeId;
use aurae_proto::runtime::v0 as pb;
use aurae_sys::{ExitStatus, Namespaces as Ns, Pidfd, SpawnRequest, spawn::Program};
use tokio::sync::watch;
use tracing::{info, warn};

pub use spec::InstanceSpec;

use self::{
    handover::{Handover, INSTANCE_ARG, INSTANCE_PORT, Lineage},
    identity::SelfIdentity,
};
use crate::{
    events::EventBus,
    identity::{Grant, Policy},
    reaper::Reaper,
    spec::{CellName, Label},
    vm::{InstanceBoot, Vms},
    workload::{
        Phase, WorkloadError, cgroup::CgroupTree, layout::INSTANCE_GROUP, supervise::wait_empty,
    },
};

/// How long a child has to become ready unless the request says.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Boots of the KVM probe guest at most, when it triple-faults.
const PROBE_TRIES: u32 = 3;
/// What a microVM instance's VMM may use beyond its guest's memory (cgroup memory.max).
pub const VMM_OVERHEAD: u64 = 64 << 20;

/// A started child: its process (the child auraed, or the VMM of its microVM), how its
/// end arrives, its link on our bridge (veth or TAP), its VM.
struct Started {
    pid: i32,
    pidfd: Arc<Pidfd>,
    exit: std::pin::Pin<Box<dyn std::future::Future<Output = Option<ExitStatus>> + Send>>,
    link: String,
    vm: Option<Arc<crate::vm::Vm>>,
}

/// How long one TCP connect to a child may take before it is tried again.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(100);

/// The pause between two readiness checks of a starting child. Short: a restored child
/// serves within about a second, and a check it refuses costs it one RST.
const READY_RETRY: Duration = Duration::from_millis(10);

/// How long a child's SVID is valid unless the request says.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);

/// How an instance is isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    VirtualMachine,
    Cell,
}

/// Where an instance is.
#[derive(Debug, Clone)]
pub struct InstanceState {
    pub phase: Phase,
    pub message: String,
    pub boot_time: Option<Duration>,
    pub ready_time: Option<Duration>,
    pub svid_expires_at: Option<SystemTime>,
    /// The child process's end.
    pub exited: Option<(Option<ExitStatus>, SystemTime)>,
}

/// One spawned instance.
#[derive(Debug)]
pub struct Instance {
    pub spec: InstanceSpec,
    pub spiffe_id: SpiffeId,
    pub isolation: Isolation,
    pub isolation_reason: String,
    pub started_at: SystemTime,
    pub depth: u32,
    pub addr: Ipv4Addr,
    pub addr6: Ipv6Addr,
    /// The child auraed's own log (its stdout and stderr, written by it straight to this
    /// file: nothing of ours sits in between, so a crash of auraed costs it nothing).
    pub log: PathBuf,
    pub state: watch::Sender<InstanceState>,
    /// The child auraed's pid (in our PID namespace).
    pub pid: i32,
    pidfd: Arc<Pidfd>,
    veth: String,
    cgroup: CellName,
    /// The route to its own bridge's subnet, through it: (bridge, subnet).
    route: (String, Ipv4Addr),
    /// A microVM instance's VM and TAP lease.
    vm: Option<Arc<crate::vm::Vm>>,
    lease: Option<crate::vm::network::Lease>,
    /// The template its microVM was restored from (None: booted).
    pub template: Option<String>,
    /// How it started and why.
    pub boot_reason: String,
}

impl Instance {
    pub fn endpoint(&self) -> SocketAddr {
        SocketAddr::from((self.addr, INSTANCE_PORT))
    }

    pub fn phase(&self) -> Phase {
        self.state.borrow().phase
    }

    pub fn gone(&self) -> bool {
        self.state.borrow().exited.is_some()
    }

    /// For a microVM once it has ended: how its VMM says the guest ended (a reset, a
    /// triple fault…), as `"; the VM: …"`; else empty.
    pub fn vm_end(&self) -> String {
        self.vm
            .as_ref()
            .map(|vm| vm.state.borrow().message.clone())
            .filter(|m| !m.is_empty())
            .map(|m| format!("; the VM: {m}"))
            .unwrap_or_default()
    }

    /// Waits for the child to end, at most `timeout`.
    pub async fn wait(&self, timeout: Option<Duration>) -> bool {
        let mut rx = self.state.subscribe();
        let w = rx.wait_for(|s| s.exited.is_some());
        match timeout {
            Some(t) => tokio::time::timeout(t, w).await.is_ok_and(|r| r.is_ok()),
            None => w.await.is_ok(),
        }
    }

    fn set(&self, f: impl FnOnce(&mut InstanceState)) {
        self.state.send_modify(f);
    }
}

/// A hook that serves our API on one more listener (the bridge address, where our
/// children renew); set by the server once it serves.
pub type ServeOn = Arc<dyn Fn(std::net::TcpListener) + Send + Sync>;

/// The domain service behind `Spawn` and the `Instances` API.
pub struct Instances {
    tree: Result<Arc<dyn CgroupTree>, String>,
    reaper: Arc<Reaper>,
    events: Arc<EventBus>,
    vms: Arc<Vms>,
    sealed: Arc<aurae_sys::memfd::SealedSelf>,
    identity: Arc<SelfIdentity>,
    logs_dir: PathBuf,
    /// Our own depth (0 for a daemon an operator started) and the deepest allowed.
    depth: u32,
    max_depth: u32,
    /// The kernel and modules microVM instances boot (`--instance-kernel`,
    /// `--instance-modules`), and whether KVM really boots it here (probed once).
    vm_kernel: Option<PathBuf>,
    vm_modules: Option<PathBuf>,
    probe: watch::Sender<Probe>,
    instances: Mutex<BTreeMap<Label, Arc<Instance>>>,
    /// Instances being spawned, with their memory: counted by [`Instances::usage`] from
    /// the spawn's first step, so a quota's admission need not be held while they boot.
    making: Arc<Mutex<BTreeMap<Label, u64>>>,
    ops: tokio::sync::Mutex<()>,
    serve_on: OnceLock<ServeOn>,
    bridge_served: Mutex<bool>,
    next_veth: AtomicU64,
    recorder: crate::workload::record::Recorder,
    templates: Arc<template::Templates>,
}

impl std::fmt::Debug for Instances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instances")
            .field("depth", &self.depth)
            .finish_non_exhaustive()
    }
}

fn precondition(m: impl Into<String>) -> WorkloadError {
    WorkloadError::Precondition(m.into())
}

/// An instance being made (see [`Instances::start_making`]); forgotten when dropped.
struct Making {
    making: Arc<Mutex<BTreeMap<Label, u64>>>,
    name: Label,
}

impl Drop for Making {
    fn drop(&mut self) {
        if let Ok(mut m) = self.making.lock() {
            m.remove(&self.name);
        }
    }
}

/// What [`Instances::new`] needs.
#[derive(Debug)]
pub struct InstancesDeps {
    pub tree: Result<Arc<dyn CgroupTree>, String>,
    pub reaper: Arc<Reaper>,
    pub events: Arc<EventBus>,
    pub vms: Arc<Vms>,
    pub sealed: Arc<aurae_sys::memfd::SealedSelf>,
    pub identity: Arc<SelfIdentity>,
    pub logs_dir: PathBuf,
    pub lineage: Option<Lineage>,
    pub store: Option<crate::store::Store>,
    /// The kernel (and its modules) microVM instances boot.
    pub kernel: Option<PathBuf>,
    pub modules: Option<PathBuf>,
    /// Where instance templates are stored (see [`template`]).
    pub templates_dir: PathBuf,
}

/// Whether KVM boots a guest here (see [`Instances::probe_kvm`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Pending,
    Ok(Duration),
    No(String),
}

impl Instances {
    pub fn new(d: InstancesDeps) -> Self {
        let (depth, max_depth) = d
            .lineage
            .as_ref()
            .map_or((0, handover::DEFAULT_MAX_DEPTH), |l| (l.depth, l.max_depth));
        Self {
            tree: d.tree,
            reaper: d.reaper,
            events: d.events.clone(),
            vms: d.vms,
            sealed: d.sealed,
            identity: d.identity,
            logs_dir: d.logs_dir,
            depth,
            max_depth,
            probe: watch::channel(match &d.kernel {
                Some(_) => Probe::Pending,
                None => Probe::No(
                    "no --instance-kernel is configured: microVMs cannot be booted".into(),
                ),
            })
            .0,
            vm_kernel: d.kernel.clone(),
            vm_modules: d.modules.clone(),
            instances: Mutex::new(BTreeMap::new()),
            making: Arc::default(),
            ops: tokio::sync::Mutex::new(()),
            serve_on: OnceLock::new(),
            bridge_served: Mutex::new(false),
            next_veth: AtomicU64::new(0),
            recorder: crate::workload::record::Recorder::new(d.store, d.events.clone()),
            templates: {
                let (t, removed) = template::Templates::open(d.templates_dir);
                for name in removed {
                    warn!(template = %name, "removed an instance template a previous auraed left half written");
                    d.events.emit(
                        pb::Kind::Instance,
                        &name,
                        pb::EventType::Freed,
                        "an instance template left half written by a previous auraed was removed",
                    );
                }
                Arc::new(t)
            },
        }
    }

    /// The stored instance templates.
    pub fn templates(&self) -> &template::Templates {
        &self.templates
    }

    /// The server's hook for serving on the bridge address (see [`ServeOn`]).
    pub fn set_serve_on(&self, f: ServeOn) {
        let _ = self.serve_on.set(f);
    }

    pub fn identity(&self) -> &Arc<SelfIdentity> {
        &self.identity
    }

    fn tree(&self) -> Result<Arc<dyn CgroupTree>, WorkloadError> {
        self.tree.clone().map_err(WorkloadError::Precondition)
    }

    pub fn find(&self, name: &Label) -> Result<Arc<Instance>, WorkloadError> {
        self.instances
            .lock()
            .ok()
            .and_then(|m| m.get(name).cloned())
            .ok_or_else(|| WorkloadError::NotFound(format!("instance {name:?} does not exist")))
    }

    /// Instances whose names pass `visible`, in name order.
    pub fn list(&self, visible: impl Fn(&str) -> bool) -> Vec<Arc<Instance>> {
        self.instances
            .lock()
            .map(|m| {
                m.values()
                    .filter(|i| visible(i.spec.name.as_str()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Instances and their memory under the names `within` accepts (quotas), those being
    /// spawned included.
    pub fn usage(&self, within: impl Fn(&str) -> bool) -> (usize, u64) {
        let listed = self.list(&within);
        let made = listed.iter().fold((0, 0u64), |(n, m), i| {
            (n + 1, m.saturating_add(i.spec.memory_bytes))
        });
        let making = self.making.lock().map(|m| m.clone()).unwrap_or_default();
        making
            .iter()
            .filter(|(name, _)| {
                within(name.as_str()) && !listed.iter().any(|i| &i.spec.name == *name)
            })
            .fold(made, |(n, m), (_, mem)| (n + 1, m.saturating_add(*mem)))
    }

    /// Marks `spec`'s instance as being made until the guard goes; `Exists` if an
    /// instance of that name exists or is being made.
    fn start_making(&self, spec: &InstanceSpec) -> Result<Making, WorkloadError> {
        let exists =
            || WorkloadError::Exists(format!("instance {:?} already exists", spec.name.as_str()));
        if self
            .instances
            .lock()
            .is_ok_and(|m| m.contains_key(&spec.name))
        {
            return Err(exists());
        }
        let mut m = self
            .making
            .lock()
            .map_err(|_| precondition("instances lock poisoned"))?;
        if m.contains_key(&spec.name) {
            return Err(exists());
        }
        m.insert(spec.name.clone(), spec.memory_bytes);
        Ok(Making {
            making: self.making.clone(),
            name: spec.name.clone(),
        })
    }

    /// Which isolation a request gets, and why (AUTO and VIRTUAL_MACHINE wait for the
    /// KVM probe if it is still running).
    async fn choose(&self, spec: &InstanceSpec) -> Result<(Isolation, String), WorkloadError> {
        if spec.isolation == pb::Isolation::Cell {
            return Ok((Isolation::Cell, "requested".into()));
        }
        let mut rx = self.probe.subscribe();
        let probe = rx
            .wait_for(|p| *p != Probe::Pending)
            .await
            .map(|p| p.clone())
            .unwrap_or(Probe::No("the KVM probe did not finish".into()));
        match (spec.isolation, probe) {
            (pb::Isolation::VirtualMachine, Probe::Ok(_)) => {
                Ok((Isolation::VirtualMachine, "requested".into()))
            }
            (pb::Isolation::VirtualMachine, Probe::No(why)) => Err(precondition(format!(
                "isolation: ISOLATION_VIRTUAL_MACHINE is not available here: {why}"
            ))),
            (_, Probe::Ok(t)) => Ok((
                Isolation::VirtualMachine,
                format!(
                    "auto: KVM booted the instance kernel here (probe: {:.1} s)",
                    t.as_secs_f64()
                ),
            )),
            (_, Probe::No(why)) => Ok((Isolation::Cell, format!("auto: {why}"))),
            (_, Probe::Pending) => Ok((Isolation::Cell, "auto: no KVM probe result".into())),
        }
    }

    /// Boots the instance kernel once with our own binary as its init and `aurae.probe`
    /// on its command line (its PID 1 prints a marker and powers off at once): only a
    /// guest that really boots and powers off cleanly makes microVM isolation available
    /// (a `/dev/kvm` that exists but boots no stock kernel does not).
    pub async fn probe_kvm(self: Arc<Self>) {
        let Some(kernel) = self.vm_kernel.clone() else {
            return;
        };
        let t0 = Instant::now();
        // A triple fault of the probe guest is tried again (up to PROBE_TRIES boots):
        // under an emulated or nested hypervisor an L2 Linux triple-faults now and then at
        // a random point (QEMU TCG's SVM: 3 of 10 boots), which says nothing about whether
        // KVM boots a stock kernel here; one clean boot does. Anything else is an answer.
        let mut result = self.probe_once(&kernel).await;
        for attempt in 2..=PROBE_TRIES {
            match &result {
                Err(why) if why.contains("triple fault") => {
                    warn!(
                        attempt,
                        "KVM probe: the probe guest triple-faulted ({why}); booting it again"
                    );
                    result = self.probe_once(&kernel).await;
                }
                _ => break,
            }
        }
        let p = match result {
            Ok(()) => Probe::Ok(t0.elapsed()),
            Err(why) => Probe::No(format!("KVM did not boot {} here: {why}", kernel.display())),
        };
        info!(probe = ?p, "KVM probe for microVM instances");
        self.probe.send_replace(p);
    }

    async fn probe_once(&self, kernel: &std::path::Path) -> Result<(), String> {
        let tree = self.tree().map_err(|e| e.to_string())?;
        let group = instance_group(tree.as_ref()).map_err(|e| e.to_string())?;
        let sealed = self.sealed.get().map_err(|e| e.to_string())?;
        let entries = initramfs::base(&sealed, self.vm_modules.as_deref())?;
        let fd = initramfs::sealed(&entries)?;
        let lease = self
            .vms
            .network()
            .lock()
            .map_err(|_| "network lock poisoned".to_owned())?
            .lease(None)?;
        let name = Label::parse("name", "kvm-probe").map_err(|e| e.to_string())?;
        let console = self.logs_dir.join("instances").join("kvm-probe.console");
        let vm = self
            .vms
            .run_for_instance(
                &name,
                &group,
                InstanceBoot::Boot {
                    kernel: kernel.to_owned(),
                    initramfs: fd,
                    cmdline: "console=ttyS0 reboot=k panic=-1 quiet aurae.probe=1".into(),
                    drive: None,
                },
                1,
                256 << 20,
                &lease,
                console.clone(),
            )
            .await;
        let result = match vm {
            Ok(vm) => {
                let done = vm.wait(Some(Duration::from_secs(120))).await;
                let ended = vm.state.borrow().ended.clone();
                let text = vm.log.text();
                self.vms.kill_for_instance(&vm).await;
                match (done, ended) {
                    _ if text.contains(handover::PROBE_MARKER) => Ok(()),
                    (false, _) => Err("the guest did not power off within 120 s".into()),
                    (true, e) => Err(format!(
                        "the guest ended without the marker ({e:?}); console: {}",
                        text.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
                    )),
                }
            }
            Err(e) => Err(e.to_string()),
        };
        if let Ok(mut n) = self.vms.network().lock() {
            n.release(&lease);
        }
        let _ = std::fs::remove_file(&console);
        result
    }

    /// Serves our API on the bridge's address (once), where children renew.
    fn serve_on_bridge(&self, gateway: Ipv4Addr) {
        let Ok(mut served) = self.bridge_served.lock() else {
            return;
        };
        if *served {
            return;
        }
        let Some(serve) = self.serve_on.get() else {
            warn!("no listener hook: spawned instances cannot renew their SVIDs");
            return;
        };
        match std::net::TcpListener::bind((gateway, INSTANCE_PORT)) {
            Ok(l) => {
                serve(l);
                *served = true;
                info!(addr = %gateway, port = INSTANCE_PORT, "serving on the bridge for spawned instances");
            }
            // Already served (e.g. a wildcard listener on that port).
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => *served = true,
            Err(e) => warn!(
                "cannot serve on {gateway}:{INSTANCE_PORT} for spawned instances to renew: {e}"
            ),
        }
    }

    /// Spawns an instance for `caller` (whose grant the child copies for it) and waits
    /// until it is ready; on any failure everything made for it is removed. `admission`
    /// (the caller's quota admission) is released as soon as the instance counts (from
    /// its first step: [`Instances::usage`]), not held while it boots.
    pub async fn spawn<A: Send>(
        self: &Arc<Self>,
        spec: InstanceSpec,
        caller: (&SpiffeId, &Grant),
        admission: A,
    ) -> Result<Arc<Instance>, WorkloadError> {
        let (ready_timeout, svid_ttl) = (spec.ready_timeout, spec.svid_ttl);
        let t0 = Instant::now();
        let making = self.start_making(&spec);
        drop(admission);
        let _making = making?;
        let tree = self.tree()?;
        let (isolation, isolation_reason) = self.choose(&spec).await?;
        let is_vm = isolation == Isolation::VirtualMachine;
        if !is_vm && spec.template == pb::TemplateUse::TemplateRequired {
            return Err(precondition(format!(
                "template: TEMPLATE_REQUIRED restores a microVM, and this instance is a cell ({isolation_reason})"
            )));
        }
        // Not there nor being made by another spawn: `start_making` saw to that.
        let _ops = self.ops.lock().await;
        if self.depth + 1 > self.max_depth {
            return Err(precondition(format!(
                "this auraed is at depth {} of at most {}: it may not spawn deeper",
                self.depth, self.max_depth
            )));
        }
        let id = self
            .identity
            .child_id(spec.name.as_str())
            .map_err(precondition)?;

        // cgroup: instances/<name>, bounded as a whole, no block devices.
        instance_group(tree.as_ref())?;
        let cgroup = CellName::parse("name", &format!("{INSTANCE_GROUP}/{}", spec.name))?;
        tree.create(&cgroup)?;
        let mut undo = Undo {
            tree: tree.clone(),
            cgroup: Some(cgroup.clone()),
            vms: self.vms.clone(),
            addr: None,
            veth: None,
            child: None,
            route: None,
            lease: None,
            vm: None,
        };
        if tree.controllers().iter().any(|c| c == "memory") {
            // A microVM's VMM needs its guest's memory and a little of its own.
            let max = spec.memory_bytes + if is_vm { VMM_OVERHEAD } else { 0 };
            tree.write(&cgroup, "memory.max", &max.to_string())?;
        }
        // A cell child gets the cells' device filter (no block devices). A microVM's VMM
        // needs /dev/kvm and /dev/net/tun, and its jail holds nothing else (as any VM's).
        if !is_vm {
            tree.attach_device_filter(&cgroup, Default::default())
                .map_err(|e| {
                    precondition(format!(
                        "the instance's device filter (cgroup BPF) is not available here: {e}"
                    ))
                })?;
        }

        // Network: an address on our bridge; the child's own bridge gets another /24.
        let (addr, gateway, bridge, addr6, gateway6) = {
            let mut n = self
                .vms
                .network()
                .lock()
                .map_err(|_| precondition("network lock poisoned"))?;
            let addr = if is_vm {
                let lease = n.lease(None).map_err(precondition)?;
                let addr = lease.addr;
                undo.lease = Some(lease);
                addr
            } else {
                let addr = n.lease_addr().map_err(precondition)?;
                undo.addr = Some(addr);
                addr
            };
            (
                addr,
                n.gateway,
                n.bridge.clone(),
                n.ipv6_of(addr),
                n.gateway6(),
            )
        };
        self.serve_on_bridge(gateway);
        // Where the spawn's time goes, for "instance ready".
        let mut laps = aurae_vmm::Laps::start_at(t0);
        laps.lap("group and address");
        let depth = self.depth + 1;
        let bridge_gateway =
            Ipv4Addr::new(10, 200u8.saturating_add(depth as u8), addr.octets()[3], 1);

        // Identity and policy: minted now, handed over once, in memory.
        let minted = self
            .identity
            .mint(&id, vec![IpAddr::V4(addr), IpAddr::V6(addr6)], svid_ttl)
            .map_err(precondition)?;
        laps.lap("identity minted");
        let parent_grant = Grant::everything(self.identity.id.clone());
        let mut grants: Vec<(&SpiffeId, &Grant)> = vec![(&self.identity.id, &parent_grant)];
        if caller.0 != &self.identity.id {
            grants.push(caller);
        }
        let policy_toml = Policy::render(&grants);
        let creds = self.identity.creds();
        let h = Handover {
            name: spec.name.to_string(),
            spiffe_id: id.to_string(),
            ca_pem: creds.ca_pem,
            cert_pem: minted.cert_pem,
            key_pem: minted.key_pem,
            signer_chain_pem: minted.signer_chain_pem,
            signer_key_pem: minted.signer_key_pem,
            policy_toml,
            interface: "eth0".into(),
            addr,
            gateway,
            addr6,
            gateway6,
            bridge_gateway,
            parent_endpoint: SocketAddr::from((gateway, INSTANCE_PORT)).to_string(),
            parent_id: self.identity.id.to_string(),
            depth,
            max_depth: self.max_depth,
            svid_ttl_s: svid_ttl.as_secs(),
        };
        let log = self
            .logs_dir
            .join("instances")
            .join(format!("{}.log", spec.name));
        let (template, mut boot_reason) = if is_vm {
            match self.template_for(&spec, &cgroup, t0 + ready_timeout).await {
                Ok(t) => t,
                Err(e) => return Err(undo.fail(e.to_string()).await),
            }
        } else {
            (None, "a cell: our own binary, started at once".into())
        };
        laps.lap("template chosen");
        let mut restored_from = None;
        let started = match template {
            Some((name, state, memory)) => {
                match self
                    .start_vm_restored(&spec, &cgroup, h.clone(), state, memory, &log, &mut undo)
                    .await
                {
                    Ok((s, took)) => {
                        boot_reason = format!(
                            "restored from template {name} (restore {:.1} ms)",
                            took.unwrap_or_default().as_secs_f64() * 1e3
                        );
                        restored_from = Some(name.to_string());
                        Ok(s)
                    }
                    Err(e) if spec.template == pb::TemplateUse::TemplateAuto => {
                        warn!(instance = %spec.name, template = %name, "restoring the template failed, booting instead: {e}");
                        boot_reason = format!("booted: restoring template {name} failed: {e}");
                        self.start_vm(&spec, &cgroup, h, &log, &mut undo).await
                    }
                    Err(e) => Err(e),
                }
            }
            None if is_vm => self.start_vm(&spec, &cgroup, h, &log, &mut undo).await,
            None => {
                self.start_cell(&tree, &cgroup, h, &log, &bridge, &mut undo)
                    .await
            }
        };
        let Started {
            pid,
            pidfd,
            exit,
            link,
            vm,
        } = match started {
            Ok(s) => s,
            Err(e) => return Err(undo.fail(e.to_string()).await),
        };
        // Its own bridge's subnet (its children) is reached through it.
        let child_net = Ipv4Addr::new(
            bridge_gateway.octets()[0],
            bridge_gateway.octets()[1],
            bridge_gateway.octets()[2],
            0,
        );
        match aurae_sys::netlink::add_route_v4(&bridge, child_net, 24, addr) {
            Ok(()) => undo.route = Some((bridge.clone(), child_net)),
            Err(e) => {
                warn!(instance = %spec.name, "no route to its children's subnet {child_net}/24: {e}")
            }
        }
        let boot_time = t0.elapsed();
        laps.lap("started");

        let (state, _) = watch::channel(InstanceState {
            phase: Phase::Starting,
            message: String::new(),
            boot_time: Some(boot_time),
            ready_time: None,
            svid_expires_at: Some(minted.expires_at),
            exited: None,
        });
        let inst = Arc::new(Instance {
            spec,
            spiffe_id: id,
            isolation,
            isolation_reason,
            started_at: SystemTime::now(),
            depth,
            addr,
            addr6,
            log,
            state,
            pid,
            pidfd,
            veth: link,
            cgroup,
            route: (bridge.clone(), child_net),
            vm,
            lease: undo.lease.clone(),
            template: restored_from,
            boot_reason,
        });
        self.supervise(&inst, exit);

        // Ready: health SERVING over mTLS from exactly the SPIFFE ID we minted.
        match self.wait_ready(&inst, t0 + ready_timeout).await {
            Ok(()) => {}
            Err(e) => {
                warn!(instance = %inst.spec.name, output = %tail(&inst.log, 40), "spawn failed: {e}");
                let tail = tail(&inst.log, 6);
                let msg = if tail.is_empty() {
                    e.to_string()
                } else {
                    format!("{e}; its last output: {tail}")
                };
                let failed = match e {
                    WorkloadError::Deadline(_) => WorkloadError::Deadline(msg.clone()),
                    _ => precondition(msg.clone()),
                };
                let _ = undo.fail(msg).await;
                let _ = std::fs::remove_file(&inst.log);
                return Err(failed);
            }
        }
        undo.disarm();
        inst.set(|s| {
            s.phase = Phase::Running;
            s.ready_time = Some(t0.elapsed());
        });
        if let Ok(mut m) = self.instances.lock() {
            m.insert(inst.spec.name.clone(), inst.clone());
        }
        self.record(&inst);
        laps.lap("ready");
        // Each step's own time, in order: "group and address 12.3, identity minted 40.1, …".
        let steps_ms = format!("{laps:.1}");
        info!(instance = %inst.spec.name, id = %inst.spiffe_id, pid, addr = %addr, ready_ms = t0.elapsed().as_millis() as u64, steps_ms = %steps_ms, "instance ready");
        self.events.emit(
            pb::Kind::Instance,
            inst.spec.name.as_str(),
            pb::EventType::Started,
            format!("{} at {}", inst.spiffe_id, inst.endpoint()),
        );
        Ok(inst)
    }

    /// A cell-isolated child: the handover in a sealed memfd on fd 3, auraed from our
    /// sealed copy as the init of a new cell, its veth.
    async fn start_cell(
        &self,
        tree: &Arc<dyn CgroupTree>,
        cgroup: &CellName,
        h: Handover,
        log: &std::path::Path,
        bridge: &str,
        undo: &mut Undo,
    ) -> Result<Started, WorkloadError> {
        let memfd = serde_json::to_vec(&h)
            .map_err(|e| precondition(format!("handover: {e}")))
            .and_then(|bytes| {
                aurae_sys::memfd::sealed_bytes(&bytes, "aurae-handover").map_err(WorkloadError::Io)
            });
        drop(h);
        let memfd = memfd?;

        // The child: auraed from our sealed copy, init of a new cell.
        let out_w = open_log(log)?;
        let leaf = tree.leaf_fd(cgroup)?;
        let sealed = self.sealed.get()?;
        let reaper = self.reaper.clone();
        let child = tokio::task::spawn_blocking(move || {
            let argv: Vec<std::ffi::CString> = ["auraed-instance", INSTANCE_ARG]
                .iter()
                .filter_map(|s| std::ffi::CString::new(*s).ok())
                .collect();
            let envp: Vec<std::ffi::CString> =
                ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "AURAED_LOG=info"]
                    .iter()
                    .filter_map(|s| std::ffi::CString::new(*s).ok())
                    .collect();
            let devnull = std::fs::File::open("/dev/null")?;
            let req = SpawnRequest {
                program: Program::Fd(sealed.as_raw_fd()),
                argv: &argv,
                envp: &envp,
                cwd: Some(c"/"),
                uid: None,
                gid: None,
                no_new_privs: true,
                stdio: [devnull.as_raw_fd(), out_w.as_raw_fd(), out_w.as_raw_fd()],
                controlling_terminal: false,
                pass_fd: Some(memfd.as_raw_fd()),
                cgroup: Some(leaf.as_raw_fd()),
                new_namespaces: Ns(Ns::PID | Ns::MOUNT | Ns::NET | Ns::UTS | Ns::IPC | Ns::CGROUP),
                pid_namespace_of: None,
                join: None,
                unshare: Ns(0),
                container: None,
                console: None,
            };
            crate::workload::spawner::Spawner::spawn(reaper.as_ref(), &req).map_err(|source| {
                WorkloadError::Spawn {
                    what: "starting the instance's auraed".into(),
                    source,
                }
            })
        })
        .await
        .map_err(|e| precondition(format!("spawn task: {e}")))??;
        let pid = child.pid;
        let pidfd = child.pidfd.clone();
        undo.child = Some(pidfd.clone());

        // Its veth: our end on the bridge, its end (eth0) born in its network namespace.
        let veth = format!(
            "aurae-i{}",
            self.next_veth.fetch_add(1, Ordering::SeqCst) + 1
        );
        let made = aurae_sys::netlink::create_veth(&veth, "eth0", pid)
            .and_then(|()| {
                undo.veth = Some(veth.clone());
                aurae_sys::net::add_to_bridge(bridge, &veth)
            })
            .and_then(|()| aurae_sys::net::set_link_up(&veth));
        if let Err(e) = made {
            return Err(precondition(format!("the instance's veth {veth}: {e}")));
        }
        let exit = child.exit;
        Ok(Started {
            pid,
            pidfd,
            exit: Box::pin(async move { exit.await.ok() }),
            link: veth,
            vm: None,
        })
    }

    /// A microVM child: the instance kernel, an initramfs built here in memory with our
    /// binary as `/init` and the handover as files, a TAP on our bridge.
    async fn start_vm(
        &self,
        spec: &InstanceSpec,
        cgroup: &CellName,
        h: Handover,
        log: &std::path::Path,
        undo: &mut Undo,
    ) -> Result<Started, WorkloadError> {
        let kernel = self
            .vm_kernel
            .clone()
            .ok_or_else(|| precondition("no --instance-kernel is configured"))?;
        let lease = undo
            .lease
            .clone()
            .ok_or_else(|| precondition("no TAP lease"))?;
        let sealed = self.sealed.get()?;
        let modules = self.vm_modules.clone();
        let entries =
            tokio::task::spawn_blocking(move || -> Result<Vec<initramfs::Entry>, String> {
                let mut e = initramfs::base(&sealed, modules.as_deref())?;
                let file = |path: &str, mode: u32, data: &str| initramfs::Entry::File {
                    path: path.into(),
                    mode,
                    data: data.as_bytes().to_vec(),
                };
                e.push(file("etc/aurae/pki/ca.pem", 0o644, &h.ca_pem));
                e.push(file("etc/aurae/pki/auraed.pem", 0o644, &h.cert_pem));
                e.push(file("etc/aurae/pki/auraed.key", 0o600, &h.key_pem));
                e.push(file("etc/aurae/pki/signer.pem", 0o644, &h.signer_chain_pem));
                e.push(file("etc/aurae/pki/signer.key", 0o600, &h.signer_key_pem));
                e.push(file("etc/aurae/policy.toml", 0o600, &h.policy_toml));
                let place = handover::Place::of(&h);
                let json = serde_json::to_string(&place).map_err(|e| e.to_string())?;
                e.push(file(
                    handover::PLACE_FILE.trim_start_matches('/'),
                    0o644,
                    &json,
                ));
                Ok(e)
            })
            .await
            .map_err(|e| precondition(format!("initramfs task: {e}")))?
            .map_err(precondition)?;
        let fd = initramfs::sealed(&entries).map_err(precondition)?;
        drop(entries);
        let cmdline = format!(
            "console=ttyS0 reboot=k panic=-1 quiet {}",
            self.instance_params(&lease, &spec.name)?
        );
        let boot = InstanceBoot::Boot {
            kernel,
            initramfs: fd,
            cmdline,
            drive: None,
        };
        let (started, _) = self.run_vm(spec, cgroup, boot, &lease, log, undo).await?;
        Ok(started)
    }

    /// A microVM child restored from a template: its handover (`h`, its MAC, addresses,
    /// hostname, a seed and the time) on the drive where the template's zeros were.
    /// Returns how long the restore itself took (the VMM's report).
    #[allow(clippy::too_many_arguments)]
    async fn start_vm_restored(
        &self,
        spec: &InstanceSpec,
        cgroup: &CellName,
        h: Handover,
        state: std::fs::File,
        memory: std::fs::File,
        log: &std::path::Path,
        undo: &mut Undo,
    ) -> Result<(Started, Option<Duration>), WorkloadError> {
        let lease = undo
            .lease
            .clone()
            .ok_or_else(|| precondition("no TAP lease"))?;
        let params = self.instance_params(&lease, &spec.name)?;
        let drive = template::Personal::new(h, lease.mac, params)
            .and_then(|p| template::encode(&p))
            .and_then(|bytes| {
                aurae_sys::memfd::sealed_bytes(&bytes, "aurae-handover").map_err(|e| e.to_string())
            })
            .map_err(precondition)?;
        let boot = InstanceBoot::Restore {
            state,
            memory,
            drive,
        };
        let (started, vm) = self.run_vm(spec, cgroup, boot, &lease, log, undo).await?;
        let took = vm.state.borrow().restore_time;
        Ok((started, took))
    }

    /// The instance's microVM started (booted or restored) on `lease`, in `undo`.
    async fn run_vm(
        &self,
        spec: &InstanceSpec,
        cgroup: &CellName,
        boot: InstanceBoot,
        lease: &crate::vm::network::Lease,
        log: &std::path::Path,
        undo: &mut Undo,
    ) -> Result<(Started, Arc<crate::vm::Vm>), WorkloadError> {
        let vm = self
            .vms
            .run_for_instance(
                &spec.name,
                cgroup,
                boot,
                spec.vcpus,
                spec.memory_bytes,
                lease,
                log.to_owned(),
            )
            .await?;
        undo.vm = Some(vm.clone());
        let vm2 = vm.clone();
        let started = Started {
            pid: vm.pid,
            pidfd: vm.pidfd.clone(),
            exit: Box::pin(async move {
                vm2.wait(None).await;
                let p = vm2.state.borrow().process;
                p.and_then(|(st, _)| st)
            }),
            link: lease.tap.clone(),
            vm: Some(vm.clone()),
        };
        Ok((started, vm))
    }

    /// What a microVM instance's PID 1 configures its network and name from: on the
    /// kernel command line of a booted one, in the handover of a restored one.
    fn instance_params(
        &self,
        lease: &crate::vm::network::Lease,
        name: &Label,
    ) -> Result<String, WorkloadError> {
        self.vms
            .network()
            .lock()
            .map(|n| {
                format!(
                    "{} aurae.ip6={}/64@eth0 aurae.gw6={} aurae.hostname={name}",
                    n.cmdline(lease),
                    n.ipv6_of(lease.addr),
                    n.gateway6(),
                )
            })
            .map_err(|_| precondition("network lock poisoned"))
    }

    /// Whether a microVM instance is restored from a template, and why: TEMPLATE_AUTO
    /// takes a stored one, TEMPLATE_REQUIRED builds it first (in the instance's own
    /// cgroup, before its VM, within its ready deadline), TEMPLATE_NEVER boots.
    async fn template_for(
        &self,
        spec: &InstanceSpec,
        cgroup: &CellName,
        deadline: Instant,
    ) -> Result<(Option<(Label, std::fs::File, std::fs::File)>, String), WorkloadError> {
        let mode = spec.template;
        if mode == pb::TemplateUse::TemplateNever {
            return Ok((None, "booted: the request said TEMPLATE_NEVER".into()));
        }
        let Some(kernel) = self.vm_kernel.clone() else {
            return Err(precondition("no --instance-kernel is configured"));
        };
        let sealed = self.sealed.get()?;
        let modules = self.vm_modules.clone();
        let templates = self.templates.clone();
        let (vcpus, memory) = (spec.vcpus, spec.memory_bytes);
        let name = tokio::task::spawn_blocking(move || {
            let binary = std::fs::File::from(sealed.try_clone().map_err(|e| e.to_string())?);
            templates.current_name(&kernel, modules.as_deref(), &binary, vcpus, memory)
        })
        .await
        .map_err(|e| precondition(format!("template task: {e}")))?
        .map_err(|e| precondition(format!("instance template: {e}")))?;
        let label = Label::parse("template", &name)?;
        let store = self.templates.store()?;
        if store.info(&label).is_err() {
            if mode == pb::TemplateUse::TemplateAuto {
                return Ok((
                    None,
                    format!(
                        "booted: no template is stored for {vcpus} vCPU, {} MiB (TEMPLATE_REQUIRED builds {name})",
                        memory >> 20
                    ),
                ));
            }
            let _one = self.templates.building.lock().await;
            if store.info(&label).is_err() {
                self.build_template(&label, spec, cgroup, deadline).await?;
            }
        }
        let templates = self.templates.clone();
        let l2 = label.clone();
        let files = tokio::task::spawn_blocking(move || templates.open_files(&l2))
            .await
            .map_err(|e| precondition(format!("template task: {e}")))?;
        match files {
            Ok((state, memory)) => Ok((
                Some((label, state, memory)),
                format!("restoring template {name}"),
            )),
            Err(e) if mode == pb::TemplateUse::TemplateAuto => {
                warn!(instance = %spec.name, "not using template {name}: {e}");
                Ok((None, format!("booted: template {name}: {e}")))
            }
            Err(e) => Err(e),
        }
    }

    /// Boots the template `name` (no identity, no address, an empty handover drive) in
    /// `cgroup`, waits for its PID 1 to say it waits, and snapshots it into the store.
    /// Stale templates are removed first.
    async fn build_template(
        &self,
        name: &Label,
        spec: &InstanceSpec,
        cgroup: &CellName,
        deadline: Instant,
    ) -> Result<(), WorkloadError> {
        let t0 = Instant::now();
        let templates = &self.templates;
        for t in templates.list(|i| templates.is_current(i)) {
            if !t.current
                && let Ok(stale) = Label::parse("template", &t.info.name)
            {
                match templates.remove(&stale) {
                    Ok(()) => info!(template = %stale, "removed a stale instance template"),
                    Err(e) => warn!(template = %stale, "a stale instance template stays: {e}"),
                }
            }
        }
        if templates.list(|_| true).len() >= template::MAX_TEMPLATES {
            return Err(WorkloadError::Exhausted(format!(
                "{} instance templates are stored already (Instances/RemoveTemplate frees one)",
                template::MAX_TEMPLATES
            )));
        }
        let kernel = self
            .vm_kernel
            .clone()
            .ok_or_else(|| precondition("no --instance-kernel is configured"))?;
        let sealed = self.sealed.get()?;
        let modules = self.vm_modules.clone();
        let entries =
            tokio::task::spawn_blocking(move || initramfs::base(&sealed, modules.as_deref()))
                .await
                .map_err(|e| precondition(format!("initramfs task: {e}")))?
                .map_err(precondition)?;
        let initramfs = initramfs::sealed(&entries).map_err(precondition)?;
        drop(entries);
        let drive = aurae_sys::memfd::sealed_bytes(
            &vec![0u8; template::DRIVE_BYTES],
            "aurae-template-drive",
        )?;
        let lease = self
            .vms
            .network()
            .lock()
            .map_err(|_| precondition("network lock poisoned"))?
            .lease(None)
            .map_err(precondition)?;
        let log = self
            .logs_dir
            .join("instances")
            .join(format!("{name}.template.log"));
        let vm = self
            .vms
            .run_for_instance(
                name,
                cgroup,
                InstanceBoot::Boot {
                    kernel,
                    initramfs,
                    cmdline: format!(
                        "console=ttyS0 reboot=k panic=-1 quiet {}",
                        template::TEMPLATE_PARAM
                    ),
                    drive: Some(drive),
                },
                spec.vcpus,
                spec.memory_bytes,
                &lease,
                log.clone(),
            )
            .await;
        let result = match vm {
            Ok(vm) => {
                let waited = loop {
                    if vm.log.text().contains(template::WAITING_MARKER) {
                        break Ok(());
                    }
                    if vm.gone() {
                        break Err(precondition(format!(
                            "the template's guest ended before it waited for its identity: {}",
                            vm.state.borrow().message
                        )));
                    }
                    if Instant::now() > deadline {
                        break Err(WorkloadError::Deadline(format!(
                            "the template's guest was not ready in time: it did not wait for its identity within the ready timeout ({:.0} s)",
                            t0.elapsed().as_secs_f64()
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                let stored = match waited {
                    Ok(()) => {
                        let store = templates.store()?;
                        Vms::snapshot_into(&vm, store, name).await.map(|_| ())
                    }
                    Err(e) => Err(e),
                };
                self.vms.kill_for_instance(&vm).await;
                stored
            }
            Err(e) => Err(e),
        };
        if let Ok(mut n) = self.vms.network().lock() {
            n.release(&lease);
        }
        let output = tail(&log, 6);
        let _ = std::fs::remove_file(&log);
        match result {
            Ok(()) => {
                templates.written(name);
                info!(template = %name, took_ms = t0.elapsed().as_millis() as u64, "instance template built");
                self.events.emit(
                    pb::Kind::Instance,
                    name.as_str(),
                    pb::EventType::Created,
                    format!(
                        "instance template built in {:.1} s",
                        t0.elapsed().as_secs_f64()
                    ),
                );
                Ok(())
            }
            Err(e) if output.is_empty() => Err(e),
            Err(WorkloadError::Deadline(m)) => Err(WorkloadError::Deadline(format!(
                "building template {name}: {m}; its last output: {output}"
            ))),
            Err(e) => Err(precondition(format!(
                "building template {name}: {e}; its last output: {output}"
            ))),
        }
    }

    /// Notices the child's end: phase, cause, event.
    fn supervise(
        self: &Arc<Self>,
        inst: &Arc<Instance>,
        exit: std::pin::Pin<Box<dyn std::future::Future<Output = Option<ExitStatus>> + Send>>,
    ) {
        let inst = inst.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            let status = exit.await;
            let stopping = inst.phase() == Phase::Stopping;
            let clean = stopping || matches!(status, Some(ExitStatus::Code(0)));
            let cause = match status {
                Some(ExitStatus::Code(c)) => format!("its auraed exited with code {c}"),
                Some(ExitStatus::Signal(s)) => format!("its auraed was killed by signal {s}"),
                None => "its auraed ended".into(),
            };
            let tail = tail(&inst.log, 4);
            let message = if clean || tail.is_empty() {
                cause.clone()
            } else {
                format!("{cause}; its last output: {tail}")
            };
            inst.set(|s| {
                if s.phase != Phase::Starting || !clean {
                    s.phase = if clean { Phase::Exited } else { Phase::Failed };
                }
                s.message = message.clone();
                s.exited = Some((status, SystemTime::now()));
            });
            events.emit(
                pb::Kind::Instance,
                inst.spec.name.as_str(),
                if clean {
                    pb::EventType::Exited
                } else {
                    pb::EventType::Failed
                },
                message,
            );
        });
    }

    /// What an instance costs this machine: the usage of its cgroup here (the child
    /// auraed and all it runs, or the VMM and the whole guest) and its memory.max (None
    /// without a memory controller).
    pub fn host_stats(&self, inst: &Instance) -> Option<(crate::cell::CellStats, Option<u64>)> {
        let tree = self.tree().ok()?;
        let stats = crate::cell::registry::read_stats(tree.as_ref(), &inst.cgroup);
        let max = tree
            .read(&inst.cgroup, "memory.max")
            .ok()
            .and_then(|m| m.trim().parse::<u64>().ok());
        Some((stats, max))
    }

    /// A client of the child, requiring its SPIFFE ID.
    pub async fn connect(&self, inst: &Instance) -> Result<aurae_client::Client, WorkloadError> {
        let tls = self
            .identity
            .client_tls(&inst.spiffe_id)
            .map_err(precondition)?;
        // TCP connects get a short deadline of their own: a SYN sent before the child's
        // address is up is lost, and the kernel would resend it only after a second.
        let addr = inst.endpoint();
        let dial = move || std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT);
        aurae_client::Client::connect_tcp_with_keepalive(dial, &inst.addr.to_string(), tls)
            .await
            .map_err(|e| precondition(format!("{}: {}", inst.endpoint(), error_chain(&e))))
    }

    async fn wait_ready(&self, inst: &Instance, deadline: Instant) -> Result<(), WorkloadError> {
        let mut last = String::from("no answer yet");
        loop {
            if let Some((status, _)) = inst.state.borrow().exited {
                let how = inst.vm_end();
                return Err(precondition(format!(
                    "instance {:?} ended before it was ready ({status:?}){how}",
                    inst.spec.name.as_str()
                )));
            }
            if Instant::now() >= deadline {
                return Err(WorkloadError::Deadline(format!(
                    "instance {:?} was not ready in time (last: {last}); everything made for it was removed",
                    inst.spec.name.as_str()
                )));
            }
            // Each try (connect, handshake, health call) is bounded as a whole: a child
            // that accepts and then stops answering must not hold the spawn past its
            // deadline.
            let left = deadline.saturating_duration_since(Instant::now());
            let try_for = left.min(Duration::from_secs(5));
            let check = async {
                let c = self.connect(inst).await?;
                let req = tonic_health::pb::HealthCheckRequest::default();
                Ok::<_, WorkloadError>(c.health().check(req).await)
            };
            match tokio::time::timeout(try_for, check).await {
                Ok(Ok(Ok(r))) if r.get_ref().status == 1 => return Ok(()),
                Ok(Ok(Ok(r))) => last = format!("health {}", r.get_ref().status),
                Ok(Ok(Err(e))) => last = e.message().to_owned(),
                Ok(Err(e)) => {
                    let text = e.to_string();
                    // A certificate that is not the one minted for it: refused at once.
                    // (Our verifier's TlsError::UnexpectedId, as rustls shows it.)
                    if text.contains("UnexpectedId")
                        || text.contains("the peer presented SPIFFE ID")
                    {
                        return Err(precondition(format!(
                            "instance {:?} presented the wrong identity and was refused: {text}",
                            inst.spec.name.as_str()
                        )));
                    }
                    last = text;
                }
                Err(_) => last = format!("no answer within {} ms", try_for.as_millis()),
            }
            tokio::time::sleep(READY_RETRY).await;
        }
    }

    /// Asks the child to shut down in order (`Daemon/Shutdown` with `grace`), waits for
    /// it, and kills what is left after the grace period.
    pub async fn stop(
        &self,
        name: &Label,
        grace: Duration,
    ) -> Result<Arc<Instance>, WorkloadError> {
        let _ops = self.ops.lock().await;
        let inst = self.find(name)?;
        self.stop_one(&inst, grace).await;
        Ok(inst)
    }

    async fn stop_one(&self, inst: &Arc<Instance>, grace: Duration) {
        if inst.gone() {
            return;
        }
        inst.set(|s| s.phase = Phase::Stopping);
        let asked = match self.connect(inst).await {
            Ok(c) => {
                let req = pb::ShutdownRequest {
                    grace_period: prost_types::Duration::try_from(grace).ok(),
                    reboot: false,
                };
                c.daemon()
                    .shutdown(req)
                    .await
                    .map_err(|e| e.message().to_owned())
            }
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = &asked {
            warn!(instance = %inst.spec.name, "asking the instance to shut down: {e}; killing it");
        }
        let wait = if asked.is_ok() {
            grace + Duration::from_secs(10)
        } else {
            Duration::ZERO
        };
        if !inst.wait(Some(wait)).await {
            let _ = inst.pidfd.send_signal(nix::libc::SIGKILL);
            if let Ok(t) = self.tree() {
                let _ = t.kill(&inst.cgroup);
            }
            inst.wait(Some(Duration::from_secs(10))).await;
        }
        self.events.emit(
            pb::Kind::Instance,
            inst.spec.name.as_str(),
            pb::EventType::Stopped,
            "",
        );
    }

    /// Removes an instance: its process (killed if it still runs), veth, address, cgroup
    /// subtree and log. Its secrets lived only in its own memory and tmpfs.
    pub async fn free(&self, name: &Label) -> Result<(), WorkloadError> {
        self.free_inner(name, None).await
    }

    /// [`Instances::free`] of exactly `inst`: nothing when the name is gone or now names
    /// another instance (freed and spawned again meanwhile).
    pub async fn free_exact(&self, inst: &Arc<Instance>) -> Result<(), WorkloadError> {
        match self.free_inner(&inst.spec.name, Some(inst)).await {
            Err(WorkloadError::NotFound(_)) => Ok(()),
            r => r,
        }
    }

    async fn free_inner(
        &self,
        name: &Label,
        expect: Option<&Arc<Instance>>,
    ) -> Result<(), WorkloadError> {
        let _ops = self.ops.lock().await;
        let inst = self.find(name)?;
        if expect.is_some_and(|e| !Arc::ptr_eq(e, &inst)) {
            return Ok(());
        }
        if !inst.gone() {
            let _ = inst.pidfd.send_signal(nix::libc::SIGKILL);
            inst.wait(Some(Duration::from_secs(10))).await;
        }
        let undo = Undo {
            tree: self.tree()?,
            cgroup: Some(inst.cgroup.clone()),
            vms: self.vms.clone(),
            addr: inst.lease.is_none().then_some(inst.addr),
            veth: inst.lease.is_none().then(|| inst.veth.clone()),
            child: None,
            route: Some(inst.route.clone()),
            lease: inst.lease.clone(),
            vm: inst.vm.clone(),
        };
        undo.run().await?;
        if let Ok(mut m) = self.instances.lock() {
            m.remove(name);
        }
        let _ = std::fs::remove_file(&inst.log);
        self.recorder.delete(
            pb::Kind::Instance,
            crate::store::kinds::INSTANCE,
            name.as_str(),
        );
        self.events
            .emit(pb::Kind::Instance, name.as_str(), pb::EventType::Freed, "");
        Ok(())
    }

    /// Signs a renewal for the caller, which must be one of our running instances.
    pub fn renew(
        &self,
        caller: &SpiffeId,
        csr_pem: &str,
        signer_csr_pem: &str,
    ) -> Result<(String, String, SystemTime), WorkloadError> {
        let inst = caller
            .path()
            .rsplit('/')
            .next()
            .and_then(|n| Label::parse("name", n).ok())
            .and_then(|n| self.find(&n).ok())
            .filter(|i| i.spiffe_id == *caller)
            .ok_or_else(|| {
                WorkloadError::NotFound(format!("{caller} is not an instance this auraed spawned"))
            })?;
        if inst.gone() {
            return Err(precondition(format!(
                "instance {:?} has ended",
                inst.spec.name.as_str()
            )));
        }
        let ttl = inst.spec.svid_ttl;
        let (cert, signer) = self.identity.renew(
            caller,
            vec![IpAddr::V4(inst.addr), IpAddr::V6(inst.addr6)],
            ttl,
            csr_pem,
            signer_csr_pem,
        )?;
        let expires = SystemTime::now() + ttl;
        inst.set(|s| s.svid_expires_at = Some(expires));
        self.record(&inst);
        info!(instance = %inst.spec.name, "renewed its SVID");
        Ok((cert, signer, expires))
    }

    /// Ordered shutdown: every instance stopped at once (one `grace` in all, not one per
    /// instance), then freed.
    pub async fn shutdown(self: &Arc<Self>, grace: Duration) {
        let all = self.list(|_| true);
        let mut stops = tokio::task::JoinSet::new();
        for i in all.clone() {
            let me = self.clone();
            stops.spawn(async move { me.stop_one(&i, grace).await });
        }
        while stops.join_next().await.is_some() {}
        for i in all {
            if let Err(e) = self.free(&i.spec.name).await {
                warn!(instance = %i.spec.name, "freeing on shutdown: {e}");
            }
        }
    }
}

/// What a failed spawn (or a free) removes, in order: the child, its veth, its address,
/// its cgroup subtree.
struct Undo {
    tree: Arc<dyn CgroupTree>,
    cgroup: Option<CellName>,
    vms: Arc<Vms>,
    addr: Option<Ipv4Addr>,
    veth: Option<String>,
    child: Option<Arc<Pidfd>>,
    /// (bridge, subnet) of a route to the instance's children.
    route: Option<(String, Ipv4Addr)>,
    /// A microVM instance's TAP lease (deleted, address returned) and VM (killed).
    lease: Option<crate::vm::network::Lease>,
    vm: Option<Arc<crate::vm::Vm>>,
}

impl Undo {
    fn disarm(&mut self) {
        self.cgroup = None;
        self.addr = None;
        self.veth = None;
        self.child = None;
        self.route = None;
        self.lease = None;
        self.vm = None;
    }

    async fn fail(self, why: String) -> WorkloadError {
        if let Err(e) = self.run().await {
            warn!("cleaning up a failed spawn: {e}");
        }
        precondition(why)
    }

    async fn run(self) -> Result<(), WorkloadError> {
        if let Some(c) = &self.child {
            let _ = c.send_signal(nix::libc::SIGKILL);
        }
        if let Some(vm) = &self.vm {
            self.vms.kill_for_instance(vm).await;
        }
        if let (Some((bridge, net)), Some(addr)) = (
            &self.route,
            self.addr.or(self.lease.as_ref().map(|l| l.addr)),
        ) && let Err(e) = aurae_sys::netlink::delete_route_v4(bridge, *net, 24, addr)
        {
            warn!("deleting the route to {net}/24: {e}");
        }
        if let Some(v) = &self.veth {
            // Gone already when its peer's namespace died with the child.
            if let Err(e) = aurae_sys::netlink::delete_link(v) {
                warn!(veth = %v, "deleting the instance's veth: {e}");
            }
        }
        if let Some(cg) = &self.cgroup {
            let _ = self.tree.kill(cg);
            if !wait_empty(self.tree.as_ref(), cg, Duration::from_secs(10)).await {
                return Err(precondition(format!(
                    "the processes of {cg} still run after a kill"
                )));
            }
            // With what its auraed made below its leaf, deepest first.
            crate::workload::cgroup::remove_tree(&self.tree.path(cg)).map_err(WorkloadError::Io)?;
        }
        if let Ok(mut n) = self.vms.network().lock() {
            if let Some(a) = self.addr {
                n.release_addr(a);
            }
            if let Some(l) = &self.lease {
                n.release(l);
            }
        }
        Ok(())
    }
}

/// The instances' cgroup group (`instances`), made on first use.
fn instance_group(tree: &dyn CgroupTree) -> Result<CellName, WorkloadError> {
    let group = CellName::parse("name", INSTANCE_GROUP)?;
    if !tree.exists(&group) {
        tree.create(&group)?;
    }
    Ok(group)
}

/// The last `n` non-empty lines of the log file (its last 8 KiB), joined with " | ".
fn tail(log: &std::path::Path, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(8192)));
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        text = String::from_utf8_lossy(&buf).into_owned();
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Opens (creating, 0600, appending) an instance's log file for its auraed to write to.
fn open_log(path: &std::path::Path) -> Result<OwnedFd, WorkloadError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open(path)?;
    Ok(OwnedFd::from(f))
}

/// An error and its sources, joined.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
