//! Where a sandbox's cell lives: in this auraed (the default handler) or in the instance
//! spawned for the sandbox (the `aurae-vm` handler). Every call the CRI makes on a
//! sandbox's cell and its containers' executables goes through a [`Place`], so the paths
//! of the RuntimeService are the same for both.
//!
//! Either way the CRI identity's grant for the method is looked up in our policy first
//! ([`Cri::call`]): a policy that denies it denies it for both. Here, the call then goes
//! to our own API adapters (which also check names, ids and quotas). In an instance, it
//! goes to the child's API, called with this auraed's identity (the child's parent): the
//! instance was spawned under the CRI identity's grant, with the sandbox's name, and the
//! container's image, ids and privileges are checked here before anything is sent.

use std::{pin::Pin, sync::Arc};

use aurae_proto::{
    runtime::v0::{self as pb, cells_server::Cells, executables_server::Executables},
    service_names as svc,
};
use tokio_stream::Stream;
use tonic::Status;

use super::Cri;
use crate::instance::Instance;

/// The output of an executable, followed.
pub(super) type LogStream = Pin<Box<dyn Stream<Item = Result<pb::LogChunk, Status>> + Send>>;

/// Where a sandbox's cell and executables are.
#[derive(Clone)]
pub(super) enum Place {
    /// This auraed's own API, called as the CRI identity.
    Here(Arc<Cri>),
    /// The sandbox's instance, through its API.
    Instance {
        cri: Arc<Cri>,
        inst: Arc<Instance>,
        client: aurae_client::Client,
    },
}

impl std::fmt::Debug for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Here(_) => f.write_str("Place::Here"),
            Self::Instance { inst, .. } => write!(f, "Place::Instance({})", inst.spec.name),
        }
    }
}

/// A status from the instance, or the instance gone (NOT_FOUND: what was in it is gone),
/// saying how it ended.
fn remote(inst: &Instance, e: Status) -> Status {
    if inst.gone() {
        Status::not_found(format!(
            "the sandbox's instance {} has ended ({}{}): {}",
            inst.spec.name,
            inst.state.borrow().message,
            inst.vm_end(),
            e.message()
        ))
    } else {
        e
    }
}

impl Place {
    fn cri(&self) -> &Arc<Cri> {
        match self {
            Self::Here(cri) | Self::Instance { cri, .. } => cri,
        }
    }

    /// The CRI identity's grant for `method`, and in an instance for the instance's name
    /// too (every call into it is about that sandbox: a grant whose names do not cover
    /// the sandbox reaches nothing in it): the request of `msg`.
    pub(super) fn call<T>(
        &self,
        svc: &str,
        method: &str,
        msg: T,
    ) -> Result<tonic::Request<T>, Status> {
        let r = self.cri().call(svc, method, msg)?;
        if let Self::Instance { inst, .. } = self {
            r.extensions()
                .get::<crate::api::authz::Caller>()
                .ok_or_else(|| Status::internal("a CRI call without its caller"))?
                .authorize_name(&inst.spec.name.to_string())?;
        }
        Ok(r)
    }

    /// The sandbox's instance, when it is in one.
    pub(super) fn instance(&self) -> Option<&Arc<Instance>> {
        match self {
            Self::Here(_) => None,
            Self::Instance { inst, .. } => Some(inst),
        }
    }

    /// The client of the sandbox's instance, when it is in one.
    pub(super) fn client(&self) -> Option<&aurae_client::Client> {
        match self {
            Self::Here(_) => None,
            Self::Instance { client, .. } => Some(client),
        }
    }

    pub(super) async fn cell_get(&self, name: &str) -> Result<pb::CellStatus, Status> {
        let msg = pb::NameRef {
            name: name.to_owned(),
        };
        let r = self.call(svc::CELLS, "Get", msg.clone())?;
        match self {
            Self::Here(cri) => cri.cells.get(r).await,
            Self::Instance { inst, client, .. } => {
                client.cells().get(msg).await.map_err(|e| remote(inst, e))
            }
        }
        .map(tonic::Response::into_inner)
    }

    pub(super) async fn cell_allocate(&self, msg: pb::Cell) -> Result<pb::CellStatus, Status> {
        let r = self.call(svc::CELLS, "Allocate", msg.clone())?;
        match self {
            Self::Here(cri) => cri.cells.allocate(r).await,
            Self::Instance { inst, client, .. } => client
                .cells()
                .allocate(msg)
                .await
                .map_err(|e| remote(inst, e)),
        }
        .map(tonic::Response::into_inner)
    }

    pub(super) async fn cell_stop(&self, msg: pb::StopRequest) -> Result<(), Status> {
        let r = self.call(svc::CELLS, "Stop", msg.clone())?;
        match self {
            Self::Here(cri) => cri.cells.stop(r).await.map(|_| ()),
            Self::Instance { inst, client, .. } => client
                .cells()
                .stop(msg)
                .await
                .map(|_| ())
                .map_err(|e| remote(inst, e)),
        }
    }

    pub(super) async fn cell_free(&self, name: &str) -> Result<(), Status> {
        let msg = pb::NameRef {
            name: name.to_owned(),
        };
        let r = self.call(svc::CELLS, "Free", msg.clone())?;
        match self {
            Self::Here(cri) => cri.cells.free(r).await.map(|_| ()),
            Self::Instance { inst, client, .. } => client
                .cells()
                .free(msg)
                .await
                .map(|_| ())
                .map_err(|e| remote(inst, e)),
        }
    }

    pub(super) async fn cell_stats(&self, name: &str) -> Result<pb::ResourceStats, Status> {
        let msg = pb::NameRef {
            name: name.to_owned(),
        };
        let r = self.call(svc::CELLS, "Stats", msg.clone())?;
        match self {
            Self::Here(cri) => cri.cells.stats(r).await,
            Self::Instance { inst, client, .. } => {
                client.cells().stats(msg).await.map_err(|e| remote(inst, e))
            }
        }
        .map(tonic::Response::into_inner)
    }

    /// What the sandbox whose cell is `name` costs this machine (CPU µs, memory bytes,
    /// processes): its cell's usage here; for an instance, its cgroup's here — the VMM and
    /// the whole guest, or the child auraed and all it runs: what kubelet's eviction must
    /// weigh — or, where that cannot be read, its cell's inside it.
    pub(super) async fn sandbox_usage(&self, name: &str) -> Result<(u64, u64, u64), Status> {
        if let Self::Instance { cri, inst, .. } = self {
            cri.call(svc::CELLS, "Stats", ())?;
            if let Some((s, _)) = cri.ctx.instances.host_stats(inst) {
                return Ok((s.cpu_usage_usec, s.memory_current_bytes, s.pids_current));
            }
        }
        let s = self.cell_stats(name).await?;
        Ok((s.cpu_usage_usec, s.memory_current_bytes, s.pids_current))
    }

    pub(super) async fn run_executable(
        &self,
        msg: pb::Executable,
    ) -> Result<pb::ExecutableStatus, Status> {
        use aurae_proto::runtime::v0::runtime_server::Runtime as _;
        let r = self.call(svc::RUNTIME, "RunExecutable", msg.clone())?;
        match self {
            Self::Here(cri) => cri.runtime.run_executable(r).await,
            Self::Instance { inst, client, .. } => client
                .runtime()
                .run_executable(msg)
                .await
                .map_err(|e| remote(inst, e)),
        }
        .map(tonic::Response::into_inner)
    }

    pub(super) async fn exe_get(
        &self,
        msg: pb::ExecutableRef,
    ) -> Result<pb::ExecutableStatus, Status> {
        let r = self.call(svc::EXECUTABLES, "Get", msg.clone())?;
        match self {
            Self::Here(cri) => cri.executables.get(r).await,
            Self::Instance { inst, client, .. } => client
                .executables()
                .get(msg)
                .await
                .map_err(|e| remote(inst, e)),
        }
        .map(tonic::Response::into_inner)
    }

    pub(super) async fn exe_signal(
        &self,
        msg: pb::SignalExecutableRequest,
    ) -> Result<pb::ExecutableStatus, Status> {
        let r = self.call(svc::EXECUTABLES, "Signal", msg.clone())?;
        match self {
            Self::Here(cri) => cri.executables.signal(r).await,
            Self::Instance { inst, client, .. } => client
                .executables()
                .signal(msg)
                .await
                .map_err(|e| remote(inst, e)),
        }
        .map(tonic::Response::into_inner)
    }

    pub(super) async fn exe_wait(
        &self,
        msg: pb::WaitExecutableRequest,
    ) -> Result<pb::ExecutableStatus, Status> {
        let r = self.call(svc::EXECUTABLES, "Wait", msg.clone())?;
        match self {
            Self::Here(cri) => cri.executables.wait(r).await,
            Self::Instance { inst, client, .. } => {
                // The instance ending ends every wait in it.
                let mut exes = client.executables();
                tokio::select! {
                    w = exes.wait(msg) => w.map_err(|e| remote(inst, e)),
                    _ = inst.wait(None) => Err(remote(inst, Status::unavailable("it ended"))),
                }
            }
        }
        .map(tonic::Response::into_inner)
    }

    pub(super) async fn exe_stop(
        &self,
        msg: pb::StopExecutableRequest,
    ) -> Result<pb::ExecutableStatus, Status> {
        let r = self.call(svc::EXECUTABLES, "Stop", msg.clone())?;
        match self {
            Self::Here(cri) => cri.executables.stop(r).await,
            Self::Instance { inst, client, .. } => client
                .executables()
                .stop(msg)
                .await
                .map_err(|e| remote(inst, e)),
        }
        .map(tonic::Response::into_inner)
    }

    pub(super) async fn exe_free(&self, msg: pb::ExecutableRef) -> Result<(), Status> {
        let r = self.call(svc::EXECUTABLES, "Free", msg.clone())?;
        match self {
            Self::Here(cri) => cri.executables.free(r).await.map(|_| ()),
            Self::Instance { inst, client, .. } => client
                .executables()
                .free(msg)
                .await
                .map(|_| ())
                .map_err(|e| remote(inst, e)),
        }
    }

    pub(super) async fn exe_exec(&self, msg: pb::ExecRequest) -> Result<pb::ExecResponse, Status> {
        let r = self.call(svc::EXECUTABLES, "Exec", msg.clone())?;
        match self {
            Self::Here(cri) => cri.executables.exec(r).await,
            Self::Instance { inst, client, .. } => client
                .executables()
                .exec(msg)
                .await
                .map_err(|e| remote(inst, e)),
        }
        .map(tonic::Response::into_inner)
    }

    pub(super) async fn exe_update(
        &self,
        msg: pb::UpdateExecutableRequest,
    ) -> Result<pb::ExecutableStatus, Status> {
        let r = self.call(svc::EXECUTABLES, "Update", msg.clone())?;
        match self {
            Self::Here(cri) => cri.executables.update(r).await,
            Self::Instance { inst, client, .. } => client
                .executables()
                .update(msg)
                .await
                .map_err(|e| remote(inst, e)),
        }
        .map(tonic::Response::into_inner)
    }

    pub(super) async fn exe_update_files(
        &self,
        msg: pb::UpdateFilesRequest,
    ) -> Result<pb::ExecutableStatus, Status> {
        let r = self.call(svc::EXECUTABLES, "UpdateFiles", msg.clone())?;
        match self {
            Self::Here(cri) => cri.executables.update_files(r).await,
            Self::Instance { inst, client, .. } => client
                .executables()
                .update_files(msg)
                .await
                .map_err(|e| remote(inst, e)),
        }
        .map(tonic::Response::into_inner)
    }

    pub(super) async fn exe_stats(
        &self,
        msg: pb::ExecutableRef,
    ) -> Result<pb::ResourceStats, Status> {
        let r = self.call(svc::EXECUTABLES, "Stats", msg.clone())?;
        match self {
            Self::Here(cri) => cri.executables.stats(r).await,
            Self::Instance { inst, client, .. } => client
                .executables()
                .stats(msg)
                .await
                .map_err(|e| remote(inst, e)),
        }
        .map(tonic::Response::into_inner)
    }

    pub(super) async fn exe_logs(
        &self,
        msg: pb::ExecutableLogsRequest,
    ) -> Result<LogStream, Status> {
        let r = self.call(svc::EXECUTABLES, "Logs", msg.clone())?;
        match self {
            Self::Here(cri) => Ok(Box::pin(cri.executables.logs(r).await?.into_inner()) as _),
            Self::Instance { inst, client, .. } => Ok(Box::pin(
                client
                    .executables()
                    .logs(msg)
                    .await
                    .map_err(|e| remote(inst, e))?
                    .into_inner(),
            ) as _),
        }
    }
}

/// An interactive exec in a sandbox's instance, over the child's `Executables/ExecStream`:
/// its output and exit come from the child's events, its input and terminal sizes go as
/// messages. Killing it cancels the call (the child kills the command).
pub(super) async fn instance_session(
    client: &aurae_client::Client,
    request: pb::ExecRequest,
    stdio: crate::cell::exec::ExecStdio,
) -> Result<crate::cell::session::Session, Status> {
    let (stdin, tty) = match stdio {
        crate::cell::exec::ExecStdio::Pipes { stdin } => (stdin, false),
        crate::cell::exec::ExecStdio::Terminal => (true, true),
    };
    let what = format!("{:?} in an instance", request.argv);
    let (input, stream) = aurae_client::session::with_start(pb::ExecInput {
        what: Some(pb::exec_input::What::Start(pb::ExecStart {
            request: Some(request),
            stdin,
            tty,
            size: None,
        })),
    });
    let events = client.executables().exec_stream(stream).await?.into_inner();
    Ok(bridge(input, events, stdin, tty, false, what))
}

/// An attach to a container of a sandbox's instance, over the child's
/// `Executables/Attach` (`tty`: the container has a terminal). Killing it cancels the
/// call: the child detaches, the container runs on.
pub(super) async fn instance_attach(
    client: &aurae_client::Client,
    start: pb::AttachStart,
    tty: bool,
) -> Result<crate::cell::session::Session, Status> {
    let what = format!(
        "attach to {:?} in an instance",
        start.executable.as_ref().map(|e| e.name.as_str())
    );
    let stdin = start.stdin;
    let (input, stream) = aurae_client::session::with_start(pb::AttachInput {
        what: Some(pb::attach_input::What::Start(start)),
    });
    let events = client.executables().attach(stream).await?.into_inner();
    Ok(bridge(input, events, stdin, tty, true, what))
}

/// A session whose ends are a call into an instance: its events become output and exit,
/// its input and sizes messages.
fn bridge<M: aurae_client::session::InputMessage>(
    input: tokio::sync::mpsc::Sender<M>,
    mut events: tonic::Streaming<pb::ExecEvent>,
    stdin: bool,
    tty: bool,
    detaches: bool,
    what: String,
) -> crate::cell::session::Session {
    use pb::exec_event::What as Ev;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BUFFER: usize = 64 << 10;
    // Each a pair whose one end's drop is the other's end of file.
    let (stdout_r, mut stdout_w) = tokio::io::duplex(BUFFER);
    let (stderr_r, mut stderr_w) = tokio::io::duplex(BUFFER);
    let (stdin_r, stdin_w) = tokio::io::duplex(BUFFER);
    let (exit_tx, exit_rx) = tokio::sync::oneshot::channel();
    // Input and output each flow on their own (one waiting on the other would deadlock
    // once both directions are full, as `cat` makes them).
    let to_child = input.clone();
    let feed = stdin.then(|| {
        tokio::spawn(async move {
            let mut stdin_r = stdin_r;
            let mut buf = vec![0u8; 32 << 10];
            loop {
                let (msg, last) = match stdin_r.read(&mut buf).await {
                    Ok(n) if n > 0 => (M::stdin(buf[..n].to_vec()), false),
                    _ => (M::close_stdin(), true),
                };
                if to_child.send(msg).await.is_err() || last {
                    return;
                }
            }
        })
    });
    let bridge = tokio::spawn(async move {
        let exit = loop {
            match events.message().await {
                Ok(Some(pb::ExecEvent {
                    what: Some(Ev::Stdout(d)),
                })) => {
                    let _ = stdout_w.write_all(&d).await;
                }
                Ok(Some(pb::ExecEvent {
                    what: Some(Ev::Stderr(d)),
                })) => {
                    let _ = stderr_w.write_all(&d).await;
                }
                Ok(Some(pb::ExecEvent {
                    what: Some(Ev::Exit(e)),
                })) => {
                    break e.how.map(|h| match h {
                        pb::exit_status::How::Code(c) => aurae_sys::ExitStatus::Code(c),
                        pb::exit_status::How::Signal(s) => aurae_sys::ExitStatus::Signal(s),
                    });
                }
                Ok(Some(_)) => {}
                // The call ended without an exit: the instance (or the link) is gone.
                Ok(None) | Err(_) => break None,
            }
        };
        // Output written so far reaches its readers, then their end.
        drop((stdout_w, stderr_w));
        let _ = exit_tx.send(exit);
    });
    let abort = bridge.abort_handle();
    let abort_feed = feed.map(|f| f.abort_handle());
    crate::cell::session::Session {
        stdout: Some(Box::new(stdout_r)),
        stderr: (!tty).then(|| Box::new(stderr_r) as crate::cell::session::Read),
        stdin: stdin.then(|| Box::new(stdin_w) as crate::cell::session::Write),
        resize: tty.then(|| {
            Box::new(move |width: u16, height: u16| {
                let _ = input.try_send(M::resize(pb::TerminalSize {
                    width: width.into(),
                    height: height.into(),
                }));
            }) as Box<dyn Fn(u16, u16) + Send + Sync>
        }),
        exit: Box::pin(async move { exit_rx.await.ok().flatten() }),
        kill: Box::new(move || {
            abort.abort();
            if let Some(f) = abort_feed {
                f.abort();
            }
        }),
        detaches,
        what,
    }
}
