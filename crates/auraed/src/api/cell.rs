//! `Cells`: allocate a cell (quotas and privileges checked first), and the lifecycle of the
//! cells `Allocate` and `RunCell` made.

use std::sync::Arc;

use aurae_proto::runtime::v0::{self as pb, cells_server::Cells};
use tonic::{Request, Response, Status};

use super::{
    authz::Caller,
    convert,
    quota::{Demand, Quotas},
    shared::{authorized, grace, visible},
    status::invalid,
};
use crate::{
    cell::{CellSpec, Cells as CellRegistry},
    spec::CellName,
};

#[derive(Debug, Clone)]
pub struct CellsApi {
    cpus: u64,
    cells: Arc<CellRegistry>,
    quotas: Arc<Quotas>,
}

impl CellsApi {
    pub fn new(cpus: u64, cells: Arc<CellRegistry>, quotas: Arc<Quotas>) -> Self {
        Self {
            cpus,
            cells,
            quotas,
        }
    }

    fn named<T>(r: &Request<T>, name: &str) -> Result<CellName, Status> {
        Ok(authorized(r, CellName::parse("name", name), CellName::as_str)?.1)
    }
}

#[tonic::async_trait]
impl Cells for CellsApi {
    async fn allocate(&self, r: Request<pb::Cell>) -> Result<Response<pb::CellStatus>, Status> {
        let caller = Caller::of(&r)?;
        let m = r.into_inner();
        for (field, given) in [
            ("run", m.run.is_some()),
            ("executable", m.executable.is_some()),
        ] {
            if given {
                return Err(invalid(crate::spec::FieldError::new(
                    field,
                    "only for RunCell: Allocate makes the cell and starts nothing in it",
                )));
            }
        }
        let spec = CellSpec::parse(m, false, self.cpus).map_err(invalid)?;
        caller.authorize_name(spec.name.as_str())?;
        caller.authorize_privilege(
            !spec.namespaces.shares_host() || caller.grant.allow_host_namespaces,
            "share a host namespace",
            spec.name.as_str(),
        )?;
        caller.authorize_privilege(
            !spec.devices.kvm || caller.grant.allow_kvm,
            "open /dev/kvm (devices.kvm needs allow_kvm)",
            spec.name.as_str(),
        )?;
        let demand = Demand::cell(&caller, &spec);
        let _admitted = self.quotas.admit(&caller, demand).await?;
        Ok(Response::new(convert::cell(
            self.cells.allocate(spec).await?.as_ref(),
        )))
    }
    async fn get(&self, r: Request<pb::NameRef>) -> Result<Response<pb::CellStatus>, Status> {
        let name = Self::named(&r, &r.get_ref().name)?;
        Ok(Response::new(convert::cell(
            self.cells.get(&name)?.as_ref(),
        )))
    }
    async fn list(
        &self,
        r: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListCellsResponse>, Status> {
        let show = visible(&r, "name_prefix", &r.get_ref().name_prefix)?;
        let cells = self.cells.list(show);
        Ok(Response::new(pb::ListCellsResponse {
            cells: cells.iter().map(|c| convert::cell(c)).collect(),
        }))
    }
    async fn stop(&self, r: Request<pb::StopRequest>) -> Result<Response<pb::CellStatus>, Status> {
        let g = grace("grace_period", r.get_ref().grace_period.as_ref()).map_err(invalid)?;
        let name = Self::named(&r, &r.get_ref().name)?;
        Ok(Response::new(convert::cell(
            self.cells.stop(&name, g).await?.as_ref(),
        )))
    }
    async fn free(&self, r: Request<pb::NameRef>) -> Result<Response<pb::Freed>, Status> {
        let name = Self::named(&r, &r.get_ref().name)?;
        self.cells.free(&name).await?;
        let name = name.to_string();
        Ok(Response::new(pb::Freed { name }))
    }
    async fn stats(&self, r: Request<pb::NameRef>) -> Result<Response<pb::ResourceStats>, Status> {
        let name = Self::named(&r, &r.get_ref().name)?;
        Ok(Response::new(convert::stats(&self.cells.stats(&name)?)))
    }
}
