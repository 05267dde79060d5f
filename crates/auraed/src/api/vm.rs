//! `VirtualMachines`: lifecycle of the VMs `RunVirtualMachine` started, and their console.

use std::sync::Arc;

use aurae_proto::runtime::v0::{self as pb, virtual_machines_server::VirtualMachines};
use tonic::{Request, Response, Status};

use super::{
    convert,
    shared::{ResponseStream, authorized, grace, log_stream, timeout, visible},
    status::invalid,
};
use crate::{
    spec::Label,
    vm::{Vm, Vms},
};

#[derive(Debug, Clone)]
pub struct VirtualMachinesApi {
    vms: Arc<Vms>,
}

impl VirtualMachinesApi {
    pub fn new(vms: Arc<Vms>) -> Self {
        Self { vms }
    }

    /// Validates and authorizes a VM's name, and finds it.
    fn find<T>(&self, r: &Request<T>, name: &str) -> Result<Arc<Vm>, Status> {
        let (_, name) = authorized(r, Label::parse("name", name), Label::as_str)?;
        Ok(self.vms.find(&name)?)
    }
}

#[tonic::async_trait]
impl VirtualMachines for VirtualMachinesApi {
    async fn get(
        &self,
        r: Request<pb::NameRef>,
    ) -> Result<Response<pb::VirtualMachineStatus>, Status> {
        Ok(Response::new(convert::vm(
            self.find(&r, &r.get_ref().name)?.as_ref(),
        )))
    }
    async fn list(
        &self,
        r: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListVirtualMachinesResponse>, Status> {
        let show = visible(&r, "name_prefix", &r.get_ref().name_prefix)?;
        let virtual_machines = self.vms.list(show);
        Ok(Response::new(pb::ListVirtualMachinesResponse {
            virtual_machines: virtual_machines.iter().map(|v| convert::vm(v)).collect(),
        }))
    }
    async fn stop(
        &self,
        r: Request<pb::StopRequest>,
    ) -> Result<Response<pb::VirtualMachineStatus>, Status> {
        let vm = self.find(&r, &r.get_ref().name)?;
        let g = grace("grace_period", r.get_ref().grace_period.as_ref()).map_err(invalid)?;
        Ok(Response::new(convert::vm(
            self.vms.stop(&vm.spec.name, g).await?.as_ref(),
        )))
    }
    async fn wait(
        &self,
        r: Request<pb::WaitRequest>,
    ) -> Result<Response<pb::VirtualMachineStatus>, Status> {
        let vm = self.find(&r, &r.get_ref().name)?;
        if vm.wait(timeout(r.get_ref().timeout.as_ref())?).await {
            Ok(Response::new(convert::vm(&vm)))
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
        let name = vm.spec.name.to_string();
        Ok(Response::new(pb::Freed { name }))
    }
    async fn snapshot(
        &self,
        r: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::VirtualMachineSnapshot>, Status> {
        let vm = self.find(&r, &r.get_ref().name)?;
        let (_, snap) = authorized(
            &r,
            Label::parse("snapshot", &r.get_ref().snapshot),
            Label::as_str,
        )?;
        let info = self.vms.snapshot(&vm.spec.name, &snap).await?;
        Ok(Response::new(convert::vm_snapshot(&info)))
    }
    async fn list_snapshots(
        &self,
        r: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListVirtualMachineSnapshotsResponse>, Status> {
        let show = visible(&r, "name_prefix", &r.get_ref().name_prefix)?;
        let snapshots = self
            .vms
            .snapshots()?
            .list()
            .iter()
            .filter(|i| show(&i.name))
            .map(convert::vm_snapshot)
            .collect();
        Ok(Response::new(pb::ListVirtualMachineSnapshotsResponse {
            snapshots,
        }))
    }
    async fn remove_snapshot(
        &self,
        r: Request<pb::NameRef>,
    ) -> Result<Response<pb::Freed>, Status> {
        let (_, name) = authorized(&r, Label::parse("name", &r.get_ref().name), Label::as_str)?;
        self.vms.snapshots()?.remove(&name)?;
        Ok(Response::new(pb::Freed {
            name: name.to_string(),
        }))
    }
    type ConsoleStream = ResponseStream<pb::LogChunk>;
    async fn console(
        &self,
        r: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::ConsoleStream>, Status> {
        let m = r.get_ref();
        let vm = self.find(&r, &m.name)?;
        let stream = log_stream(vm.log.clone(), m.from_offset, m.follow);
        Ok(Response::new(stream))
    }
}
