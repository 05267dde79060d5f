//! The gRPC edge: one thin adapter per service, the authorization layer, error mapping.
//!
//! Lifecycle RPCs live on one service per resource kind (`Executables`, `Cells`,
//! `VirtualMachines`, `Instances`, `Pods`) next to the seed's `Runtime`, so `Runtime` keeps
//! exactly its five RPCs, each kind's verbs read naturally (`Cells/Free`), and a policy can
//! grant a whole kind with one pattern (`aurae.runtime.v0.Cells/*`).

pub mod authz;
pub mod cell;
pub mod convert;
pub mod daemon;
pub mod events;
pub mod executable;
pub mod image;
pub mod instance;
pub mod pod;
pub mod quota;
pub mod runtime;
mod shared;
pub mod status;
pub mod vm;

pub use shared::ResponseStream;

use std::{collections::BTreeSet, sync::Arc, time::SystemTime};

use aurae_identity::SpiffeId;
use aurae_proto::runtime::v0 as pb;
use prost::Message;
use tokio::sync::watch;

/// Largest request auraed decodes; larger ones get `RESOURCE_EXHAUSTED` before allocation.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Largest response auraed encodes.
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// What the adapters share.
#[derive(Debug, Clone)]
pub struct Context {
    /// "daemon" or "pid1".
    pub mode: &'static str,
    pub server_id: SpiffeId,
    pub started_at: SystemTime,
    /// CPUs of the machine (bounds cpu.max).
    pub cpus: u64,
    pub cgroup_controllers: Vec<String>,
    /// Send `Some(grace)` to start the ordered shutdown.
    pub shutdown: Arc<watch::Sender<Option<std::time::Duration>>>,
    pub cells: Arc<crate::cell::Cells>,
    /// Set by a Shutdown RPC asking PID 1 to reboot instead of powering off.
    pub reboot: Arc<std::sync::atomic::AtomicBool>,
    /// What could not be set up at start (reported by `Daemon/Info`).
    pub warnings: Vec<String>,
    pub events: Arc<crate::events::EventBus>,
    pub puller: Arc<crate::image::pull::Puller>,
    /// Canonical host directories containers may take volumes from.
    pub volume_roots: Vec<std::path::PathBuf>,
    pub vms: Arc<crate::vm::Vms>,
    /// Per-grant quotas.
    pub quotas: Arc<quota::Quotas>,
    pub instances: Arc<crate::instance::Instances>,
    pub pods: Arc<crate::pod::Pods>,
    /// Where this auraed stands if a parent spawned it.
    pub lineage: Option<crate::instance::handover::Lineage>,
}

/// Every method auraed serves, as `package.Service/Method`, from the descriptor sets:
/// decoded once per process (tens of milliseconds on an instance's one vCPU; an instance
/// template decodes them before its snapshot, `server::ahead`).
pub fn served_methods() -> &'static BTreeSet<String> {
    static METHODS: std::sync::LazyLock<BTreeSet<String>> =
        std::sync::LazyLock::new(decode_served_methods);
    &METHODS
}

fn decode_served_methods() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for fds in [
        aurae_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(fds) else {
            continue;
        };
        for file in set.file {
            let package = file.package.clone().unwrap_or_default();
            for svc in &file.service {
                for m in &svc.method {
                    out.insert(format!("{package}.{}/{}", svc.name(), m.name()));
                }
            }
        }
    }
    out
}

/// The reflection services (v1 and v1alpha) as routes of their own, for [`routes`] to
/// add the API to. Building them decodes every descriptor set twice (tens of
/// milliseconds on an instance's one vCPU): an instance template builds them before its
/// snapshot (`server::ahead`).
pub fn reflection_routes() -> Result<tonic::service::Routes, tonic_reflection::server::Error> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(aurae_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok(tonic::service::Routes::default()
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?))
}

/// The router with every service of the API, each with its message-size limits, added
/// to `reflection` ([`reflection_routes`]).
pub fn routes(
    ctx: Context,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    reflection: tonic::service::Routes,
) -> tonic::service::Routes {
    use pb::{
        cells_server::CellsServer, daemon_server::DaemonServer, events_server::EventsServer,
        executables_server::ExecutablesServer, images_server::ImagesServer,
        instances_server::InstancesServer, pods_server::PodsServer, runtime_server::RuntimeServer,
        virtual_machines_server::VirtualMachinesServer,
    };
    macro_rules! limited {
        ($server:expr) => {
            $server
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES)
        };
    }
    reflection
        .add_service(limited!(RuntimeServer::new(runtime::RuntimeApi::new(
            ctx.clone()
        ))))
        .add_service(limited!(ExecutablesServer::new(
            executable::ExecutablesApi::new(ctx.cells.clone())
        )))
        .add_service(limited!(CellsServer::new(cell::CellsApi::new(
            ctx.cpus,
            ctx.cells.clone(),
            ctx.quotas.clone()
        ))))
        .add_service(limited!(VirtualMachinesServer::new(
            vm::VirtualMachinesApi::new(ctx.vms.clone())
        )))
        .add_service(limited!(InstancesServer::new(instance::InstancesApi::new(
            ctx.instances.clone()
        ))))
        .add_service(limited!(PodsServer::new(pod::PodsApi::new(
            ctx.pods.clone()
        ))))
        .add_service(limited!(EventsServer::new(events::EventsApi::new(
            ctx.events.clone()
        ))))
        .add_service(limited!(ImagesServer::new(image::ImagesApi::new(
            ctx.puller.clone(),
            ctx.lineage.as_ref().map(|l| l.parent_id.clone())
        ))))
        .add_service(limited!(DaemonServer::new(daemon::DaemonApi::new(ctx))))
        .add_service(health)
}

/// Prepares the socket's directory (0700, created if missing) and clears a stale socket.
pub fn prepare_socket(path: &std::path::Path, flag: &str) -> anyhow::Result<()> {
    use std::{
        fs, io,
        os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
    };

    use anyhow::{Context as _, bail};
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .with_context(|| format!("{flag} {}: give a path inside a directory", path.display()))?;
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating socket directory {}", dir.display()))?;
    }
    let meta = fs::metadata(dir).with_context(|| format!("socket directory {}", dir.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if !meta.is_dir() || mode != 0o700 {
        bail!(
            "socket directory {} has mode {mode:o}; auraed needs a directory only its owner can enter (0700): \
             use a dedicated directory such as /run/aurae",
            dir.display()
        );
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "{} is in use: another auraed is listening on it",
                    path.display()
                );
            }
            fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "{} exists and is not a socket: refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("socket {}", path.display())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_has_exactly_the_five_seed_rpcs() {
        let methods = served_methods();
        let runtime: Vec<&str> = methods
            .iter()
            .filter_map(|m| m.strip_prefix("aurae.runtime.v0.Runtime/"))
            .collect();
        assert_eq!(
            runtime,
            [
                "RunCell",
                "RunExecutable",
                "RunPod",
                "RunVirtualMachine",
                "Spawn"
            ]
        );
        assert!(methods.contains("grpc.health.v1.Health/Check"));
        assert!(methods.contains("grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
        assert!(methods.contains("grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"));
    }
}
