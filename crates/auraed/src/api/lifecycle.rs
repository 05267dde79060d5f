//! Lifecycle services of each resource kind, and the event stream.
//!
//! Each handler authenticates (the layer did), validates the request, checks the resource
//! name against the caller's grant, then calls the noun's module. Kinds whose capability is
//! not built yet answer `UNIMPLEMENTED` naming it, after those checks.

use std::pin::Pin;

use aurae_proto::runtime::v0::{
    self as pb, cells_server::Cells, events_server::Events, executables_server::Executables,
    instances_server::Instances, pods_server::Pods, virtual_machines_server::VirtualMachines,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{
    authz::Caller,
    status::{Capability, invalid, not_built},
};
use crate::{
    executable::ExecutableRef,
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

fn cell(field: &str, s: &str) -> Result<String, FieldError> {
    CellName::parse(field, s).map(|n| n.as_str().to_owned())
}

fn label(field: &str, s: &str) -> Result<String, FieldError> {
    Label::parse(field, s).map(|n| n.as_str().to_owned())
}

fn exe(field: &str, r: Option<&pb::ExecutableRef>) -> Result<String, FieldError> {
    ExecutableRef::parse(field, r).map(|r| r.cell.as_str().to_owned())
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

#[derive(Debug, Clone, Default)]
pub struct ExecutablesApi;

#[tonic::async_trait]
impl Executables for ExecutablesApi {
    async fn get(
        &self,
        r: Request<pb::ExecutableRef>,
    ) -> Result<Response<pb::ExecutableStatus>, Status> {
        Err(gate(
            &r,
            exe("executable", Some(r.get_ref())),
            Capability::Cells,
        ))
    }
    async fn list(
        &self,
        r: Request<pb::ListExecutablesRequest>,
    ) -> Result<Response<pb::ListExecutablesResponse>, Status> {
        Err(gate_list(&r, &r.get_ref().cell_prefix, Capability::Cells))
    }
    async fn stop(
        &self,
        r: Request<pb::StopExecutableRequest>,
    ) -> Result<Response<pb::ExecutableStatus>, Status> {
        let m = r.get_ref();
        let name = grace(m.grace_period.as_ref(), "grace_period")
            .and_then(|_| exe("executable", m.executable.as_ref()));
        Err(gate(&r, name, Capability::Cells))
    }
    async fn signal(
        &self,
        r: Request<pb::SignalExecutableRequest>,
    ) -> Result<Response<pb::ExecutableStatus>, Status> {
        let m = r.get_ref();
        let name = if (1..=64).contains(&m.signal) {
            exe("executable", m.executable.as_ref())
        } else {
            Err(FieldError::new(
                "signal",
                format!("{} is outside 1..=64", m.signal),
            ))
        };
        Err(gate(&r, name, Capability::Cells))
    }
    async fn wait(
        &self,
        r: Request<pb::WaitExecutableRequest>,
    ) -> Result<Response<pb::ExecutableStatus>, Status> {
        let m = r.get_ref();
        let name = grace(m.timeout.as_ref(), "timeout")
            .and_then(|_| exe("executable", m.executable.as_ref()));
        Err(gate(&r, name, Capability::Cells))
    }
    async fn free(&self, r: Request<pb::ExecutableRef>) -> Result<Response<pb::Freed>, Status> {
        Err(gate(
            &r,
            exe("executable", Some(r.get_ref())),
            Capability::Cells,
        ))
    }
    type LogsStream = ResponseStream<pb::LogChunk>;
    async fn logs(
        &self,
        r: Request<pb::ExecutableLogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        Err(gate(
            &r,
            exe("executable", r.get_ref().executable.as_ref()),
            Capability::Cells,
        ))
    }
    async fn stats(
        &self,
        r: Request<pb::ExecutableRef>,
    ) -> Result<Response<pb::ResourceStats>, Status> {
        Err(gate(
            &r,
            exe("executable", Some(r.get_ref())),
            Capability::Cells,
        ))
    }
}

#[derive(Debug, Clone)]
pub struct CellsApi {
    cpus: u64,
}

impl CellsApi {
    pub fn new(cpus: u64) -> Self {
        Self { cpus }
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
        Err(not_built(&caller.method, Capability::Cells))
    }
    async fn get(&self, r: Request<pb::NameRef>) -> Result<Response<pb::CellStatus>, Status> {
        Err(gate(&r, cell("name", &r.get_ref().name), Capability::Cells))
    }
    async fn list(
        &self,
        r: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListCellsResponse>, Status> {
        Err(gate_list(&r, &r.get_ref().name_prefix, Capability::Cells))
    }
    async fn stop(&self, r: Request<pb::StopRequest>) -> Result<Response<pb::CellStatus>, Status> {
        let m = r.get_ref();
        let name =
            grace(m.grace_period.as_ref(), "grace_period").and_then(|_| cell("name", &m.name));
        Err(gate(&r, name, Capability::Cells))
    }
    async fn free(&self, r: Request<pb::NameRef>) -> Result<Response<pb::Freed>, Status> {
        Err(gate(&r, cell("name", &r.get_ref().name), Capability::Cells))
    }
    async fn stats(&self, r: Request<pb::NameRef>) -> Result<Response<pb::ResourceStats>, Status> {
        Err(gate(&r, cell("name", &r.get_ref().name), Capability::Cells))
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

named_lifecycle!(
    VirtualMachinesApi,
    VirtualMachines,
    pb::VirtualMachineStatus,
    pb::ListVirtualMachinesResponse,
    Capability::VirtualMachines,
    {
        type ConsoleStream = ResponseStream<pb::LogChunk>;
        async fn console(
            &self,
            r: Request<pb::LogsRequest>,
        ) -> Result<Response<Self::ConsoleStream>, Status> {
            Err(Self::named(&r, &r.get_ref().name))
        }
    }
);
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

#[derive(Debug, Clone, Default)]
pub struct EventsApi;

#[tonic::async_trait]
impl Events for EventsApi {
    type WatchStream = ResponseStream<pb::Event>;
    async fn watch(
        &self,
        r: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = Caller::of(&r)?;
        let m = r.get_ref();
        for (i, k) in m.kinds.iter().enumerate() {
            known_enum::<pb::Kind>(&format!("kinds[{i}]"), *k, false).map_err(invalid)?;
        }
        name_prefix("name_prefix", &m.name_prefix).map_err(invalid)?;
        Err(not_built(&caller.method, Capability::Cells))
    }
}
