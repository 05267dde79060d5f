//! Small helpers over the API that tests and benches repeat: wait for an executable, read
//! its whole log.

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;

pub fn exe_ref(cell: &str, name: &str) -> pb::ExecutableRef {
    pb::ExecutableRef {
        cell: cell.into(),
        name: name.into(),
    }
}

/// Waits (up to two minutes) for an executable to exit and returns its status.
pub async fn wait(
    c: &Client,
    cell: &str,
    name: &str,
) -> Result<pb::ExecutableStatus, tonic::Status> {
    c.executables()
        .wait(pb::WaitExecutableRequest {
            executable: Some(exe_ref(cell, name)),
            timeout: Some(prost_types::Duration {
                seconds: 120,
                nanos: 0,
            }),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// A log stream (executable output, VM console) read to its end, as text.
pub async fn collect(mut s: tonic::Streaming<pb::LogChunk>) -> Result<String, tonic::Status> {
    let mut out = Vec::new();
    while let Some(chunk) = s.message().await? {
        out.extend(chunk.data);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The executable's output (stdout and stderr interleaved): with `follow`, all of it once
/// it ends; without, what it has written so far.
pub async fn logs(
    c: &Client,
    cell: &str,
    name: &str,
    follow: bool,
) -> Result<String, tonic::Status> {
    let s = c
        .executables()
        .logs(pb::ExecutableLogsRequest {
            executable: Some(exe_ref(cell, name)),
            follow,
            from_offset: 0,
        })
        .await?;
    collect(s.into_inner()).await
}

/// The executable's status (`Executables/Get`).
pub async fn status(
    c: &Client,
    cell: &str,
    name: &str,
) -> Result<pb::ExecutableStatus, tonic::Status> {
    Ok(c.executables().get(exe_ref(cell, name)).await?.into_inner())
}

/// The executable's whole output (stdout and stderr interleaved), once its output ends.
pub async fn output(c: &Client, cell: &str, name: &str) -> Result<String, tonic::Status> {
    logs(c, cell, name, true).await
}

/// A VM's serial console so far.
pub async fn console(c: &Client, vm: &str) -> Result<String, tonic::Status> {
    let s = c
        .virtual_machines()
        .console(pb::LogsRequest {
            name: vm.into(),
            follow: false,
            from_offset: 0,
        })
        .await?;
    collect(s.into_inner()).await
}

/// A pod's container output so far (from its instance).
pub async fn pod_output(c: &Client, pod: &str) -> Result<String, tonic::Status> {
    let s = c
        .pods()
        .logs(pb::LogsRequest {
            name: pod.into(),
            follow: false,
            from_offset: 0,
        })
        .await?;
    collect(s.into_inner()).await
}

/// Runs `e`, waits for it, and returns its status and output.
pub async fn run_to_end(
    c: &Client,
    e: pb::Executable,
) -> Result<(pb::ExecutableStatus, String), tonic::Status> {
    let (cell, name) = (e.cell.clone(), e.name.clone());
    c.runtime().run_executable(e).await?;
    let st = wait(c, &cell, &name).await?;
    Ok((st, output(c, &cell, &name).await?))
}
