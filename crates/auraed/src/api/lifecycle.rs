//! Lifecycle services of each resource kind, and the event stream.
//!
//! Each handler authenticates (the layer did), validates the request, checks the resource
//! name against the caller's grant, then calls the noun's module. Kinds whose capability is
//! not built yet answer `UNIMPLEMENTED` naming it, after those checks.

use std::{pin::Pin, sync::Arc};

use aurae_proto::runtime::v0::{
    self as pb, cells_server::Cells, events_server::Events, executables_server::Executables,
    instances_server::Instances, pods_server::Pods, virtual_machines_server::VirtualMachines,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{
    authz::Caller,
    status::{Capability, internal, invalid, not_built},
};
use crate::{
    cell::Cells as CellRegistry,
    events::EventBus,
    executable::{Executable, ExecutableRef},
    spec::{
        CellName, DEFAULT_GRACE, FieldError, Label, MAX_GRACE, duration, known_enum, name_prefix,
    },
};

pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Validates a name of a given shape, checks it against the grant, answers not-built.
fn gate<T>(req: &Request<T>, name: Result<String, FieldError>, cap: Capability) -> Status {
    let checked = Caller::of(req).and_then(|caller| {
        let name = name.map_err(invalid)?;
        caller.authorize_name(&name)?;
        Ok(caller)
    });
    match checked {
        Ok(caller) => not_built(&caller.method, cap),
        Err(status) => status,
    }
}

fn label(field: &str, s: &str) -> Result<String, FieldError> {
    Label::parse(field, s).map(|n| n.as_str().to_owned())
}

fn grace(d: Option<&prost_types::Duration>, field: &str) -> Result<(), FieldError> {
    duration(field, d, DEFAULT_GRACE, MAX_GRACE).map(|_| ())
}

/// Lists answer `UNIMPLEMENTED` too until their kind exists (an empty list would pretend);
/// the prefix is still validated.
fn gate_list<T>(req: &Request<T>, prefix: &str, cap: Capability) -> Status {
    match Caller::of(req).and_then(|c| {
        name_prefix("name_prefix", prefix)
            .map_err(invalid)
            .map(|_| c)
    }) {
        Ok(caller) => not_built(&caller.method, cap),
        Err(status) => status,
    }
}

#[derive(Debug, Clone)]
pub struct ExecutablesApi {
    cells: Arc<CellRegistry>,
}

impl ExecutablesApi {
    pub fn new(cells: Arc<CellRegistry>) -> Self {
        Self { cells }
    }

    /// Validates and authorizes an executable reference, and finds it.
    fn find<T>(
        &self,
        r: &Request<T>,
        field: &str,
        er: Option<&pb::ExecutableRef>,
    ) -> Result<Arc<Executable>, Status> {
        let caller = Caller::of(r)?;
        let er = ExecutableRef::parse(field, er).map_err(invalid)?;
        caller.authorize_name(er.cell.as_str())?;
        Ok(self.cells.executable(&er)?)
    }
}

/// Streams a log: replay from `from`, then (if `follow`) new output until the process's
/// output ends.
fn log_stream(
    log: Arc<crate::executable::logs::Log>,
    from: u64,
    follow: bool,
) -> ResponseStream<pb::LogChunk> {
    use crate::executable::logs::Stream as S;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut next = from;
        let mut updates = log.subscribe();
        loop {
            let (chunks, dropped) = log.read_from(next);
            for c in chunks {
                next = c.offset + c.data.len() as u64;
                let chunk = pb::LogChunk {
                    offset: c.offset,
                    stream: match c.stream {
                        S::Stdout => pb::LogStream::Stdout,
                        S::Stderr => pb::LogStream::Stderr,
                    } as i32,
                    data: c.data,
                    at: Some(c.at.into()),
                    dropped,
                };
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
            let closed = updates.borrow_and_update().1;
            if !follow || (closed && log.read_from(next).0.is_empty()) {
                return;
            }
            if updates.changed().await.is_err() {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl Executables for ExecutablesApi {
    async fn get(
        &self,
        r: Request<pb::ExecutableRef>,
    ) -> Result<Response<pb::ExecutableStatus>, Status> {
        let e = self.find(&r, "executable", Some(r.get_ref()))?;
        Ok(Response::new(e.status()))
    }
    async fn list(
        &self,
        r: Request<pb::ListExecutablesRequest>,
    ) -> Result<Response<pb::ListExecutablesResponse>, Status> {
        let caller = Caller::of(&r)?;
        let prefix = name_prefix("cell_prefix", &r.get_ref().cell_prefix).map_err(invalid)?;
        let executables = self
            .cells
            .executables(|n| n.starts_with(&prefix) && caller.grant.allows_name(n));
        Ok(Response::new(pb::ListExecutablesResponse { executables }))
    }
    async fn stop(
        &self,
        r: Request<pb::StopExecutableRequest>,
    ) -> Result<Response<pb::ExecutableStatus>, Status> {
        let m = r.get_ref();
        let g = duration(
            "grace_period",
            m.grace_period.as_ref(),
            DEFAULT_GRACE,
            MAX_GRACE,
        )
        .map_err(invalid)?;
        let e = self.find(&r, "executable", m.executable.as_ref())?;
        e.stop(g).await.map_err(internal)?;
        Ok(Response::new(e.status()))
    }
    async fn signal(
        &self,
        r: Request<pb::SignalExecutableRequest>,
    ) -> Result<Response<pb::ExecutableStatus>, Status> {
        let m = r.get_ref();
        if !(1..=64).contains(&m.signal) {
            return Err(invalid(FieldError::new(
                "signal",
                format!("{} is outside 1..=64", m.signal),
            )));
        }
        let e = self.find(&r, "executable", m.executable.as_ref())?;
        if !e.signal(m.signal).map_err(internal)? {
            return Err(Status::failed_precondition(format!(
                "executable {}/{} has exited: nothing was signalled",
                e.cell, e.name
            )));
        }
        Ok(Response::new(e.status()))
    }
    async fn wait(
        &self,
        r: Request<pb::WaitExecutableRequest>,
    ) -> Result<Response<pb::ExecutableStatus>, Status> {
        let m = r.get_ref();
        let timeout = m
            .timeout
            .as_ref()
            .map(|t| duration("timeout", Some(t), DEFAULT_GRACE, MAX_GRACE))
            .transpose()
            .map_err(invalid)?;
        let e = self.find(&r, "executable", m.executable.as_ref())?;
        match e.wait(timeout).await {
            Some(_) => Ok(Response::new(e.status())),
            None => Err(Status::deadline_exceeded(format!(
                "executable {}/{} is still running",
                e.cell, e.name
            ))),
        }
    }
    async fn free(&self, r: Request<pb::ExecutableRef>) -> Result<Response<pb::Freed>, Status> {
        let caller = Caller::of(&r)?;
        let er = ExecutableRef::parse("executable", Some(r.get_ref())).map_err(invalid)?;
        caller.authorize_name(er.cell.as_str())?;
        self.cells.free_executable(&er)?;
        Ok(Response::new(pb::Freed {
            name: format!("{}/{}", er.cell, er.name),
        }))
    }
    type LogsStream = ResponseStream<pb::LogChunk>;
    async fn logs(
        &self,
        r: Request<pb::ExecutableLogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let m = r.get_ref();
        let e = self.find(&r, "executable", m.executable.as_ref())?;
        Ok(Response::new(log_stream(
            e.log.clone(),
            m.from_offset,
            m.follow,
        )))
    }
    async fn stats(
        &self,
        r: Request<pb::ExecutableRef>,
    ) -> Result<Response<pb::ResourceStats>, Status> {
        let e = self.find(&r, "executable", Some(r.get_ref()))?;
        Ok(Response::new(process_stats(&e)))
    }
}

/// An executable's own usage from /proc (cgroup figures are per cell). Read while it
/// runs; the pidfd check afterwards makes sure the pid was still ours.
fn process_stats(e: &Executable) -> pb::ResourceStats {
    if e.exited() {
        return pb::ResourceStats::default();
    }
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", e.pid)).unwrap_or_default();
    let status = std::fs::read_to_string(format!("/proc/{}/status", e.pid)).unwrap_or_default();
    if e.pidfd.send_signal(0).is_err() {
        return pb::ResourceStats::default();
    }
    // Fields after the command (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let hz = 100u64; // USER_HZ on Linux
    let (utime, stime) = (ticks(11) * 1_000_000 / hz, ticks(12) * 1_000_000 / hz);
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| {
                l.strip_prefix(key)?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
            * 1024
    };
    pb::ResourceStats {
        cpu_usage_usec: utime + stime,
        cpu_user_usec: utime,
        cpu_system_usec: stime,
        memory_current_bytes: kib("VmRSS:"),
        memory_peak_bytes: kib("VmHWM:"),
        pids_current: kib("Threads:") / 1024,
        ..Default::default()
    }
}

#[derive(Debug, Clone)]
pub struct CellsApi {
    cpus: u64,
    cells: Arc<CellRegistry>,
    quotas: Arc<super::quota::Quotas>,
}

impl CellsApi {
    pub fn new(cpus: u64, cells: Arc<CellRegistry>, quotas: Arc<super::quota::Quotas>) -> Self {
        Self {
            cpus,
            cells,
            quotas,
        }
    }

    fn named<T>(r: &Request<T>, name: &str) -> Result<CellName, Status> {
        let caller = Caller::of(r)?;
        let name = CellName::parse("name", name).map_err(invalid)?;
        caller.authorize_name(name.as_str())?;
        Ok(name)
    }
}

#[tonic::async_trait]
impl Cells for CellsApi {
    async fn allocate(&self, r: Request<pb::Cell>) -> Result<Response<pb::CellStatus>, Status> {
        let caller = Caller::of(&r)?;
        let spec =
            crate::cell::CellSpec::parse(r.into_inner(), false, self.cpus).map_err(invalid)?;
        caller.authorize_name(spec.name.as_str())?;
        caller.authorize_privilege(
            !spec.namespaces.shares_host() || caller.grant.allow_host_namespaces,
            "share a host namespace",
            spec.name.as_str(),
        )?;
        let _admitted = self
            .quotas
            .admit(&caller, super::quota::Demand::cell(&caller, &spec))
            .await?;
        Ok(Response::new(self.cells.allocate(spec).await?))
    }
    async fn get(&self, r: Request<pb::NameRef>) -> Result<Response<pb::CellStatus>, Status> {
        let name = Self::named(&r, &r.get_ref().name)?;
        Ok(Response::new(self.cells.get(&name)?))
    }
    async fn list(
        &self,
        r: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListCellsResponse>, Status> {
        let caller = Caller::of(&r)?;
        let prefix = name_prefix("name_prefix", &r.get_ref().name_prefix).map_err(invalid)?;
        let cells = self
            .cells
            .list(|n| n.starts_with(&prefix) && caller.grant.allows_name(n));
        Ok(Response::new(pb::ListCellsResponse { cells }))
    }
    async fn stop(&self, r: Request<pb::StopRequest>) -> Result<Response<pb::CellStatus>, Status> {
        let g = duration(
            "grace_period",
            r.get_ref().grace_period.as_ref(),
            DEFAULT_GRACE,
            MAX_GRACE,
        )
        .map_err(invalid)?;
        let name = Self::named(&r, &r.get_ref().name)?;
        Ok(Response::new(self.cells.stop(&name, g).await?))
    }
    async fn free(&self, r: Request<pb::NameRef>) -> Result<Response<pb::Freed>, Status> {
        let name = Self::named(&r, &r.get_ref().name)?;
        self.cells.free(&name).await?;
        Ok(Response::new(pb::Freed {
            name: name.to_string(),
        }))
    }
    async fn stats(&self, r: Request<pb::NameRef>) -> Result<Response<pb::ResourceStats>, Status> {
        let name = Self::named(&r, &r.get_ref().name)?;
        Ok(Response::new(self.cells.stats(&name)?))
    }
}

/// VMs, instances and pods share one request shape per verb: a label name. The last
/// argument holds the kind's own extra handlers (its output stream), pasted as written.
macro_rules! named_lifecycle {
    ($api:ident, $trait:ident, $status:ty, $list:ty, $cap:expr, { $($extra:tt)* }) => {
        #[derive(Debug, Clone, Default)]
        pub struct $api;

        impl $api {
            fn named<T>(r: &Request<T>, name: &str) -> Status {
                gate(r, label("name", name), $cap)
            }
            fn timed<T>(r: &Request<T>, name: &str, d: Option<&prost_types::Duration>, field: &str) -> Status {
                gate(r, grace(d, field).and_then(|_| label("name", name)), $cap)
            }
        }

        #[tonic::async_trait]
        impl $trait for $api {
            async fn get(&self, r: Request<pb::NameRef>) -> Result<Response<$status>, Status> {
                Err(Self::named(&r, &r.get_ref().name))
            }
            async fn list(&self, r: Request<pb::ListRequest>) -> Result<Response<$list>, Status> {
                Err(gate_list(&r, &r.get_ref().name_prefix, $cap))
            }
            async fn stop(&self, r: Request<pb::StopRequest>) -> Result<Response<$status>, Status> {
                Err(Self::timed(&r, &r.get_ref().name, r.get_ref().grace_period.as_ref(), "grace_period"))
            }
            async fn wait(&self, r: Request<pb::WaitRequest>) -> Result<Response<$status>, Status> {
                Err(Self::timed(&r, &r.get_ref().name, r.get_ref().timeout.as_ref(), "timeout"))
            }
            async fn free(&self, r: Request<pb::NameRef>) -> Result<Response<pb::Freed>, Status> {
                Err(Self::named(&r, &r.get_ref().name))
            }
            $($extra)*
        }
    };
}

/// `VirtualMachines`: lifecycle of the VMs `RunVirtualMachine` started.
#[derive(Debug, Clone)]
pub struct VirtualMachinesApi {
    vms: Arc<crate::vm::Vms>,
}

impl VirtualMachinesApi {
    pub fn new(vms: Arc<crate::vm::Vms>) -> Self {
        Self { vms }
    }

    fn find<T>(&self, r: &Request<T>, name: &str) -> Result<Arc<crate::vm::Vm>, Status> {
        let caller = Caller::of(r)?;
        let name = Label::parse("name", name).map_err(invalid)?;
        caller.authorize_name(name.as_str())?;
        Ok(self.vms.find(&name)?)
    }
}

#[tonic::async_trait]
impl VirtualMachines for VirtualMachinesApi {
    async fn get(
        &self,
        r: Request<pb::NameRef>,
    ) -> Result<Response<pb::VirtualMachineStatus>, Status> {
        Ok(Response::new(self.find(&r, &r.get_ref().name)?.status()))
    }
    async fn list(
        &self,
        r: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListVirtualMachinesResponse>, Status> {
        let caller = Caller::of(&r)?;
        let prefix = name_prefix("name_prefix", &r.get_ref().name_prefix).map_err(invalid)?;
        let virtual_machines = self
            .vms
            .list(|n| n.starts_with(&prefix) && caller.grant.allows_name(n));
        Ok(Response::new(pb::ListVirtualMachinesResponse {
            virtual_machines,
        }))
    }
    async fn stop(
        &self,
        r: Request<pb::StopRequest>,
    ) -> Result<Response<pb::VirtualMachineStatus>, Status> {
        let vm = self.find(&r, &r.get_ref().name)?;
        let grace = duration(
            "grace_period",
            r.get_ref().grace_period.as_ref(),
            DEFAULT_GRACE,
            MAX_GRACE,
        )
        .map_err(invalid)?;
        Ok(Response::new(self.vms.stop(&vm.spec.name, grace).await?))
    }
    async fn wait(
        &self,
        r: Request<pb::WaitRequest>,
    ) -> Result<Response<pb::VirtualMachineStatus>, Status> {
        let vm = self.find(&r, &r.get_ref().name)?;
        let timeout = match r.get_ref().timeout.as_ref() {
            None => None,
            Some(_) => Some(
                duration(
                    "timeout",
                    r.get_ref().timeout.as_ref(),
                    MAX_GRACE,
                    MAX_GRACE,
                )
                .map_err(invalid)?,
            ),
        };
        if vm.wait(timeout).await {
            Ok(Response::new(vm.status()))
        } else {
            Err(Status::deadline_exceeded(format!(
                "virtual machine {} is still running",
                vm.spec.name
            )))
        }
    }
    async fn free(&self, r: Request<pb::NameRef>) -> Result<Response<pb::Freed>, Status> {
        let vm = self.find(&r, &r.get_ref().name)?;
        self.vms.free(&vm.spec.name).await?;
        Ok(Response::new(pb::Freed {
            name: vm.spec.name.to_string(),
        }))
    }
    type ConsoleStream = ResponseStream<pb::LogChunk>;
    async fn console(
        &self,
        r: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::ConsoleStream>, Status> {
        let m = r.get_ref();
        let vm = self.find(&r, &m.name)?;
        Ok(Response::new(log_stream(
            vm.log.clone(),
            m.from_offset,
            m.follow,
        )))
    }
}

named_lifecycle!(
    InstancesApi,
    Instances,
    pb::InstanceStatus,
    pb::ListInstancesResponse,
    Capability::Instances,
    {}
);
named_lifecycle!(
    PodsApi,
    Pods,
    pb::PodStatus,
    pb::ListPodsResponse,
    Capability::Pods,
    {
        type LogsStream = ResponseStream<pb::LogChunk>;
        async fn logs(
            &self,
            r: Request<pb::LogsRequest>,
        ) -> Result<Response<Self::LogsStream>, Status> {
            Err(Self::named(&r, &r.get_ref().name))
        }
    }
);

#[derive(Debug, Clone)]
pub struct EventsApi {
    events: Arc<EventBus>,
}

impl EventsApi {
    pub fn new(events: Arc<EventBus>) -> Self {
        Self { events }
    }
}

/// The name the grant is checked against: an executable's event is about its cell
/// (`team-a/api` of cell `team-a` is not cell `team-a/api`).
fn event_resource(e: &pb::Event) -> &str {
    if e.kind == pb::Kind::Executable as i32 {
        e.name.rsplit_once('/').map_or("", |(cell, _)| cell)
    } else {
        &e.name
    }
}

#[tonic::async_trait]
impl Events for EventsApi {
    type WatchStream = ResponseStream<pb::Event>;
    async fn watch(
        &self,
        r: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = Caller::of(&r)?;
        let m = r.into_inner();
        for (i, k) in m.kinds.iter().enumerate() {
            known_enum::<pb::Kind>(&format!("kinds[{i}]"), *k, false).map_err(invalid)?;
        }
        let prefix = name_prefix("name_prefix", &m.name_prefix).map_err(invalid)?;
        let kinds = m.kinds;
        let wanted = move |e: &pb::Event| {
            (kinds.is_empty() || kinds.contains(&e.kind))
                && e.name.starts_with(&prefix)
                && caller.grant.allows_name(event_resource(e))
        };
        let (replay, mut rx) = self.events.subscribe(m.after_sequence);
        let (tx, out) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut last = 0;
            for e in replay {
                last = e.sequence;
                if wanted(&e) && tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            loop {
                match rx.recv().await {
                    Ok(e) if e.sequence > last => {
                        last = e.sequence;
                        if wanted(&e) && tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::resource_exhausted(format!(
                                "watcher fell {n} events behind; resume with after_sequence"
                            ))))
                            .await;
                        return;
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executable_events_are_about_their_cell() {
        let ev = |kind: pb::Kind, name: &str| pb::Event {
            kind: kind as i32,
            name: name.into(),
            ..Default::default()
        };
        assert_eq!(
            event_resource(&ev(pb::Kind::Executable, "team-a/api")),
            "team-a"
        );
        assert_eq!(
            event_resource(&ev(pb::Kind::Executable, "team-a/api/web")),
            "team-a/api"
        );
        assert_eq!(event_resource(&ev(pb::Kind::Executable, "noslash")), "");
        assert_eq!(
            event_resource(&ev(pb::Kind::Cell, "team-a/api")),
            "team-a/api"
        );
    }
}
