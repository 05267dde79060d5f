//! `Daemon`: who auraed is, who the caller is, and an orderly shutdown.

use aurae_proto::runtime::v0::{self as pb, daemon_server::Daemon};
use tonic::{Request, Response, Status};

use super::{Context, authz::Caller, status::invalid};
use crate::spec::{DEFAULT_GRACE, MAX_GRACE, duration};

#[derive(Debug, Clone)]
pub struct DaemonApi {
    ctx: Context,
}

impl DaemonApi {
    pub fn new(ctx: Context) -> Self {
        Self { ctx }
    }
}

#[tonic::async_trait]
impl Daemon for DaemonApi {
    async fn info(
        &self,
        req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::DaemonInfo>, Status> {
        let caller = Caller::of(&req)?;
        let (granted_methods, granted_prefixes) = caller.grant.describe();
        Ok(Response::new(pb::DaemonInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            mode: self.ctx.mode.to_owned(),
            peer_id: caller.id.to_string(),
            server_id: self.ctx.server_id.to_string(),
            started_at: Some(self.ctx.started_at.into()),
            cgroup_controllers: self.ctx.cgroup_controllers.clone(),
            granted_methods,
            granted_prefixes,
            granted_extras: caller.grant.describe_extra(),
            warnings: self.ctx.warnings.clone(),
            policy: self
                .ctx
                .lineage
                .as_ref()
                .map(|l| l.policy_toml.clone())
                .unwrap_or_default(),
            parent_id: self
                .ctx
                .lineage
                .as_ref()
                .map(|l| l.parent_id.clone())
                .unwrap_or_default(),
            depth: self.ctx.lineage.as_ref().map_or(0, |l| l.depth),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            server_key_sha256: aurae_identity::tls::public_key_der(
                &self.ctx.instances.identity().creds().cert_pem,
            )
            .map(|der| {
                use sha2::Digest;
                sha2::Sha256::digest(der)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            })
            .unwrap_or_default(),
        }))
    }

    async fn shutdown(
        &self,
        req: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        let caller = Caller::of(&req)?;
        let m = req.get_ref();
        let grace = duration(
            "grace_period",
            m.grace_period.as_ref(),
            DEFAULT_GRACE,
            MAX_GRACE,
        )
        .map_err(invalid)?;
        if m.reboot && self.ctx.mode != "pid1" {
            return Err(Status::failed_precondition(
                "reboot: auraed runs as a daemon, not as PID 1; it can only shut itself down",
            ));
        }
        tracing::warn!(peer_id = %caller.id, grace_s = grace.as_secs_f64(), "shutdown requested over the API");
        self.ctx
            .reboot
            .store(m.reboot, std::sync::atomic::Ordering::SeqCst);
        // Answer first; the server stops accepting and drains once this response is sent.
        let _ = self.ctx.shutdown.send(Some(grace));
        Ok(Response::new(pb::ShutdownResponse {}))
    }
}
