//! The verbs `aer vm`, `aer instance` and `aer pod` share: get, list, stop, wait and free
//! by name, one implementation for the three services.

use std::time::Duration;

use aurae_proto::runtime::v0 as pb;
use clap::Subcommand;
use tonic::Status;

use super::name;
use crate::{
    output::{Format, Row, print},
    units::{parse_duration, proto_duration},
};

/// Flattened into each kind's subcommands, so `aer vm get NAME` reads as before.
#[derive(Debug, Subcommand)]
pub enum Lifecycle {
    /// Show one by name.
    Get {
        /// Its name (`list` shows them), e.g. web.
        name: String,
    },
    /// Show all of them.
    #[command(visible_alias = "ls")]
    List,
    /// Ask it to stop, then kill it once the grace period is over.
    Stop {
        /// Its name (`list` shows them), e.g. web.
        name: String,
        /// How long to wait after the graceful request before killing: a number with ms,
        /// s, m or h (plain = seconds), at most 10m, e.g. 30s [default: auraed's, 10s].
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        grace: Option<Duration>,
    },
    /// Wait until it has exited, and show how it ended.
    Wait {
        /// Its name (`list` shows them), e.g. web.
        name: String,
        /// Give up after this long (DEADLINE_EXCEEDED): a number with ms, s, m or h (plain
        /// = seconds), e.g. 5m [default: wait as long as it takes].
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        timeout: Option<Duration>,
    },
    /// Remove it (and everything made for it).
    Free {
        /// Its name (`list` shows them), e.g. web.
        name: String,
    },
}

/// A kind's client seen through the verbs it shares with the other kinds; implemented for
/// each client by the `kind!` macro.
pub trait Kind {
    type Status;
    fn row(s: &Self::Status) -> Row;
    /// Fields only `-o json` shows, after [`Kind::row`]'s (none unless the kind has some).
    fn detail(_s: &Self::Status) -> Row {
        Vec::new()
    }
    async fn get(&mut self, r: pb::NameRef) -> Result<Self::Status, Status>;
    async fn list(&mut self, r: pb::ListRequest) -> Result<Vec<Self::Status>, Status>;
    async fn stop(&mut self, r: pb::StopRequest) -> Result<Self::Status, Status>;
    async fn wait(&mut self, r: pb::WaitRequest) -> Result<Self::Status, Status>;
    async fn free(&mut self, r: pb::NameRef) -> Result<(), Status>;
}

/// `kind!(Client, Status, list_field, row_fn[, detail_fn])`: [`Kind`] for a generated tonic
/// client whose List answer holds its statuses in `list_field`, printed with `row_fn` (and
/// in JSON also `detail_fn`'s fields).
macro_rules! kind {
    ($client:ty, $status:ty, $list:ident, $row:path $(, $detail:path)?) => {
        const _: () = {
            use ::aurae_proto::runtime::v0 as pb;
            use ::tonic::Status;

            impl $crate::cmd::lifecycle::Kind for $client {
                type Status = $status;
                fn row(s: &$status) -> $crate::output::Row {
                    $row(s)
                }
                $(
                    fn detail(s: &$status) -> $crate::output::Row {
                        $detail(s)
                    }
                )?
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

/// A status as `fmt` shows it: the kind's row, plus its detail in JSON.
pub fn shown<K: Kind>(fmt: Format, s: &K::Status) -> Row {
    let mut row = K::row(s);
    if fmt == Format::Json {
        row.extend(K::detail(s));
    }
    row
}

/// Runs one shared verb against a kind's client; stop and wait take auraed's defaults
/// unless `--grace` / `--timeout` say otherwise.
pub async fn run<K: Kind>(mut k: K, cmd: Lifecycle, fmt: Format) -> Result<(), Status> {
    match cmd {
        Lifecycle::Get { name: n } => {
            let s = k.get(name(&n)).await?;
            print(fmt, &[shown::<K>(fmt, &s)], true);
        }
        Lifecycle::List => {
            let all = k.list(pb::ListRequest::default()).await?;
            let rows: Vec<Row> = all.iter().map(|s| shown::<K>(fmt, s)).collect();
            print(fmt, &rows, false);
        }
        Lifecycle::Stop { name, grace } => {
            let grace_period = grace.map(proto_duration);
            let s = k.stop(pb::StopRequest { name, grace_period }).await?;
            print(fmt, &[shown::<K>(fmt, &s)], true);
        }
        Lifecycle::Wait { name, timeout } => {
            let timeout = timeout.map(proto_duration);
            let s = k.wait(pb::WaitRequest { name, timeout }).await?;
            print(fmt, &[shown::<K>(fmt, &s)], true);
        }
        Lifecycle::Free { name: n } => k.free(name(&n)).await?,
    }
    Ok(())
}
