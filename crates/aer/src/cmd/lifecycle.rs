//! The verbs `aer vm`, `aer instance` and `aer pod` share: get, list, stop, wait and free
//! by name, one implementation for the three services.

use aurae_proto::runtime::v0 as pb;
use clap::Subcommand;
use tonic::Status;

use super::name;
use crate::output::{Format, Row, print};

/// Flattened into each kind's subcommands, so `aer vm get NAME` reads as before.
#[derive(Debug, Subcommand)]
pub enum Lifecycle {
    Get { name: String },
    List,
    Stop { name: String },
    Wait { name: String },
    Free { name: String },
}

/// A kind's client seen through the verbs it shares with the other kinds; implemented for
/// each client by the `kind!` macro.
pub trait Kind {
    type Status;
    fn row(s: &Self::Status) -> Row;
    async fn get(&mut self, r: pb::NameRef) -> Result<Self::Status, Status>;
    async fn list(&mut self, r: pb::ListRequest) -> Result<Vec<Self::Status>, Status>;
    async fn stop(&mut self, r: pb::StopRequest) -> Result<Self::Status, Status>;
    async fn wait(&mut self, r: pb::WaitRequest) -> Result<Self::Status, Status>;
    async fn free(&mut self, r: pb::NameRef) -> Result<(), Status>;
}

/// `kind!(Client, Status, list_field, row_fn)`: [`Kind`] for a generated tonic client whose
/// List answer holds its statuses in `list_field`, printed with `row_fn`.
macro_rules! kind {
    ($client:ty, $status:ty, $list:ident, $row:path) => {
        const _: () = {
            use ::aurae_proto::runtime::v0 as pb;
            use ::tonic::Status;

            impl $crate::cmd::lifecycle::Kind for $client {
                type Status = $status;
                fn row(s: &$status) -> $crate::output::Row {
                    $row(s)
                }
                async fn get(&mut self, r: pb::NameRef) -> Result<$status, Status> {
                    Ok(<$client>::get(self, r).await?.into_inner())
                }
                async fn list(&mut self, r: pb::ListRequest) -> Result<Vec<$status>, Status> {
                    Ok(<$client>::list(self, r).await?.into_inner().$list)
                }
                async fn stop(&mut self, r: pb::StopRequest) -> Result<$status, Status> {
                    Ok(<$client>::stop(self, r).await?.into_inner())
                }
                async fn wait(&mut self, r: pb::WaitRequest) -> Result<$status, Status> {
                    Ok(<$client>::wait(self, r).await?.into_inner())
                }
                async fn free(&mut self, r: pb::NameRef) -> Result<(), Status> {
                    <$client>::free(self, r).await.map(drop)
                }
            }
        };
    };
}
pub(crate) use kind;

/// Runs one shared verb against a kind's client; stop and wait take auraed's defaults.
pub async fn run<K: Kind>(mut k: K, cmd: Lifecycle, fmt: Format) -> Result<(), Status> {
    match cmd {
        Lifecycle::Get { name: n } => print(fmt, &[K::row(&k.get(name(&n)).await?)], true),
        Lifecycle::List => {
            let all = k.list(pb::ListRequest::default()).await?;
            print(fmt, &all.iter().map(K::row).collect::<Vec<_>>(), false);
        }
        Lifecycle::Stop { name } => {
            let grace_period = None;
            let s = k.stop(pb::StopRequest { name, grace_period }).await?;
            print(fmt, &[K::row(&s)], true);
        }
        Lifecycle::Wait { name } => {
            let timeout = None;
            let s = k.wait(pb::WaitRequest { name, timeout }).await?;
            print(fmt, &[K::row(&s)], true);
        }
        Lifecycle::Free { name: n } => k.free(name(&n)).await?,
    }
    Ok(())
}
