//! RunPod: spawn the pod's instance, hand it the image, run the container in a cell
//! there, wait for its port. Any step that fails removes everything made so far (the
//! instance, and with it all it held) and the error names the step. The caller has
//! authorized the request and pulled the image into this auraed's store.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use aurae_identity::SpiffeId;
use aurae_proto::runtime::v0 as pb;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tracing::{info, warn};

use crate::{
    identity::Grant,
    image::{
        load::{Blob, CHUNK},
        reference::ImageRef,
        store::ImageStore,
    },
    instance::Instance,
    pod::{Pod, PodSpec, PodState, Pods, describe_exit},
    spec::Label,
    workload::{Phase, WorkloadError},
};

/// How long one TCP connect to the pod's port may take before it is tried again.
const PORT_CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// How many of the container's last output lines an error carries.
const LAST_LINES: usize = 10;

/// What a RunPod needs beside the pod's spec (owned: the work runs in a task of its
/// own, so a caller that goes away cannot stop it halfway and leave an instance behind).
#[derive(Debug)]
pub struct PodRun {
    pub spec: PodSpec,
    /// The image by the digest of the manifest that was checked
    /// (`<registry>/<repository>@<manifest>`): exactly this image is handed over, whatever
    /// the caller's reference names by the time it is sent.
    pub image: ImageRef,
    /// Its blobs in the store, manifest first (`image::load::blobs_of`).
    pub blobs: Vec<Blob>,
    /// The uid and gid the caller was authorized to run as (the image's user resolved):
    /// sent explicitly, so the instance runs exactly those.
    pub ids: (u32, u32),
    pub store: Arc<ImageStore>,
    /// Who asks: their grant is copied into the instance's policy.
    pub spawner: (SpiffeId, Grant),
    /// The container runs with no_new_privs (the caller's grant does not allow more).
    pub no_new_privileges: bool,
}

/// The error of step `what`, of the same kind as `e`.
pub(crate) fn step(what: &str, e: WorkloadError) -> WorkloadError {
    let m = |s: String| format!("{what}: {s}");
    match e {
        WorkloadError::NotFound(s) => WorkloadError::NotFound(m(s)),
        WorkloadError::Exists(s) => WorkloadError::Exists(m(s)),
        WorkloadError::Exhausted(s) => WorkloadError::Exhausted(m(s)),
        WorkloadError::Deadline(s) => WorkloadError::Deadline(m(s)),
        WorkloadError::Refused(s) => WorkloadError::Refused(m(s)),
        WorkloadError::Invalid(f) => WorkloadError::Invalid(crate::spec::FieldError::new(
            f.field,
            format!("{what}: {}", f.reason),
        )),
        other => WorkloadError::Precondition(m(other.to_string())),
    }
}

/// A status from the instance as our error (its code kept where it means the same).
fn from_status(s: tonic::Status) -> WorkloadError {
    let m = s.message().to_owned();
    match s.code() {
        tonic::Code::NotFound => WorkloadError::NotFound(m),
        tonic::Code::AlreadyExists => WorkloadError::Exists(m),
        tonic::Code::ResourceExhausted => WorkloadError::Exhausted(m),
        tonic::Code::DeadlineExceeded => WorkloadError::Deadline(m),
        // The instance names the field; its message says which.
        tonic::Code::InvalidArgument => WorkloadError::Refused(m),
        _ => WorkloadError::Precondition(m),
    }
}

/// A new pod: see the module documentation. `admitted` (the caller's quota admission)
/// goes to the instance's spawn, which releases it once the instance counts.
pub async fn run_pod<A: Send>(
    pods: Arc<Pods>,
    run: PodRun,
    admitted: A,
) -> Result<Arc<Pod>, WorkloadError> {
    let name = run.spec.name.clone();
    let held = pods.reserve(&name)?;
    let t0 = Instant::now();
    let spawned = pods
        .instances()
        .spawn(
            run.spec.instance.clone(),
            (&run.spawner.0, &run.spawner.1),
            admitted,
        )
        .await;
    let inst = spawned.map_err(|e| step("spawning the pod's instance", e))?;
    let t_spawn = t0.elapsed();
    // The steps in the instance get the instance's ready_timeout again, all together: a
    // child that stops answering halfway never holds RunPod for longer.
    // (The port wait ends by itself at the deadline, with the container's last output;
    // the outer bound leaves it the time to fetch that.)
    let budget = run.spec.instance.ready_timeout;
    let at = std::sync::Mutex::new("connecting to the pod's instance");
    let deadline = Instant::now() + budget;
    let steps = start(&pods, &inst, &run, &at, deadline);
    let started = tokio::time::timeout(budget + Duration::from_secs(5), steps)
        .await
        .unwrap_or_else(|_| {
            let at = at.lock().map(|s| *s).unwrap_or("a step in the instance");
            Err(WorkloadError::Deadline(format!(
                "{at}: not done within {} s (the instance's ready_timeout); the pod was removed",
                budget.as_secs()
            )))
        });
    match started {
        Ok((container, image)) => {
            let pod = Arc::new(Pod {
                name: name.clone(),
                instance: inst,
                image,
                container,
                listen_port: run.spec.listen_port,
                created_at: SystemTime::now(),
                state: watch::channel(PodState {
                    phase: Phase::Running,
                    message: String::new(),
                    exit: None,
                })
                .0,
            });
            pods.insert(pod.clone(), held);
            info!(
                pod = %name,
                spawn_ms = t_spawn.as_millis() as u64,
                total_ms = t0.elapsed().as_millis() as u64,
                "pod running"
            );
            Ok(pod)
        }
        Err(e) => {
            // Everything made for the pod lived in its instance: freeing it removes all.
            if let Err(free) = pods.instances().free_exact(&inst).await {
                warn!(pod = %name, "removing the instance of a pod that did not start: {free}");
            }
            Err(e)
        }
    }
}

/// Image, container, port: the steps in the instance. Returns the container's name there
/// and the image as run (`<registry>/<repository>@<manifest>`).
async fn start(
    pods: &Pods,
    inst: &Instance,
    run: &PodRun,
    at: &std::sync::Mutex<&'static str>,
    deadline: Instant,
) -> Result<(Label, String), WorkloadError> {
    let step_to = |s: &'static str| {
        if let Ok(mut g) = at.lock() {
            *g = s;
        }
    };
    let c = pods
        .instances()
        .connect(inst)
        .await
        .map_err(|e| step("connecting to the pod's instance", e))?;
    let t0 = Instant::now();
    step_to("handing the image to the instance");
    let by_digest = &run.image;
    {
        // No collection of our store while its blobs are read out.
        let _gc = run.store.gc_lock.read().await;
        load(&c, by_digest, run.blobs.clone())
            .await
            .map_err(|e| step("handing the image to the instance", e))?;
    }
    let t_load = t0.elapsed();
    let (mut container, limits) = run.spec.forward.clone();
    container.image = by_digest.to_string();
    container.no_new_privileges |= run.no_new_privileges;
    (container.uid, container.gid) = (Some(run.ids.0), Some(run.ids.1));
    let cell = pb::Cell {
        name: run.spec.name.to_string(),
        limits,
        // The pod's cell is the instance's workload: it shares the instance's network
        // namespace (its port is the instance's port), and nothing of this machine's.
        namespaces: Some(pb::CellNamespaces {
            share_host_net: true,
            ..Default::default()
        }),
        container: Some(container),
        devices: None,
        hostname: String::new(),
        run: None,
        executable: None,
    };
    step_to("starting the container in the instance");
    let status = c
        .runtime()
        .run_cell(cell)
        .await
        .map_err(|e| step("starting the container in the instance", from_status(e)))?
        .into_inner();
    let exe = status
        .executables
        .first()
        .map(|e| e.name.clone())
        .unwrap_or_default();
    let container = Label::parse("container", &exe).map_err(|e| {
        WorkloadError::Precondition(format!(
            "starting the container in the instance: it named its container {exe:?}: {}",
            e.reason
        ))
    })?;
    let t_run = t0.elapsed() - t_load;
    if let Some(port) = run.spec.listen_port {
        step_to("waiting for the container's port");
        wait_port(&c, inst, run.spec.name.as_str(), &container, port, deadline).await?;
    }
    tracing::debug!(
        pod = %run.spec.name,
        load_ms = t_load.as_millis() as u64,
        run_ms = t_run.as_millis() as u64,
        port_ms = (t0.elapsed() - t_load - t_run).as_millis() as u64,
        "RunPod timings in the instance"
    );
    Ok((container, by_digest.to_string()))
}

/// Sends the image's blobs from our store to the instance's `Images/Load`.
pub(crate) async fn load(
    c: &aurae_client::Client,
    image: &ImageRef,
    blobs: Vec<Blob>,
) -> Result<(), WorkloadError> {
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ImageBlob>(4);
    let name = image.to_string();
    let reader = tokio::task::spawn_blocking(move || -> Result<(), WorkloadError> {
        use std::io::Read;
        let mut first = Some(name);
        for b in blobs {
            let mut f = std::fs::File::open(&b.path)?;
            let mut sent = 0u64;
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = f.read(&mut buf)?;
                buf.truncate(n);
                // Every blob sends at least one message, an empty one included.
                if n == 0 && sent > 0 {
                    break;
                }
                sent += n as u64;
                let m = pb::ImageBlob {
                    image: first.take().unwrap_or_default(),
                    digest: b.digest.clone(),
                    size: b.size,
                    data: buf,
                };
                if tx.blocking_send(m).is_err() {
                    // The call ended; its status says why.
                    return Ok(());
                }
                if n == 0 {
                    break;
                }
            }
        }
        Ok(())
    });
    let answer = c
        .images()
        .load(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    reader
        .await
        .map_err(|e| WorkloadError::Precondition(format!("reading the image: {e}")))??;
    answer.map(|_| ()).map_err(from_status)
}

/// Until `port` of the instance accepts a TCP connection; the container ending first, or
/// the deadline passing, is an error carrying what the container last wrote.
async fn wait_port(
    c: &aurae_client::Client,
    inst: &Instance,
    pod: &str,
    container: &Label,
    port: u16,
    deadline: Instant,
) -> Result<(), WorkloadError> {
    let addr = std::net::SocketAddr::from((inst.addr, port));
    let exe = pb::ExecutableRef {
        cell: pod.to_owned(),
        name: container.to_string(),
    };
    let started = Instant::now();
    // Tried again after 2 ms, doubling to 50 ms: a server is usually listening within a
    // few milliseconds of its start. The container's state is asked at most every 100 ms.
    let mut pause = Duration::from_millis(2);
    let mut asked = Instant::now();
    loop {
        if tokio::time::timeout(PORT_CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            return Ok(());
        }
        let ask = asked.elapsed() >= Duration::from_millis(100) || Instant::now() >= deadline;
        if ask && let Ok(st) = c.executables().get(exe.clone()).await {
            asked = Instant::now();
            let st = st.into_inner();
            let phase = pb::Phase::try_from(st.phase).unwrap_or(pb::Phase::Unspecified);
            if matches!(phase, pb::Phase::Exited | pb::Phase::Failed) {
                return Err(WorkloadError::Precondition(format!(
                    "the container ended ({}) before port {port} accepted connections; its last output:\n{}",
                    describe_exit(st.exit.as_ref()),
                    last_lines(c, &exe).await
                )));
            }
        }
        if inst.gone() {
            return Err(WorkloadError::Precondition(format!(
                "the pod's instance ended before port {port} accepted connections"
            )));
        }
        if Instant::now() >= deadline {
            return Err(WorkloadError::Deadline(format!(
                "waiting for port {port}: nothing accepted connections on {addr} within {} s \
                 (what was left of the instance's ready_timeout); the pod was removed; the \
                 container's last output:\n{}",
                started.elapsed().as_secs(),
                last_lines(c, &exe).await
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// The container's last lines of output (what is kept of them), for an error.
async fn last_lines(c: &aurae_client::Client, exe: &pb::ExecutableRef) -> String {
    let req = pb::ExecutableLogsRequest {
        executable: Some(exe.clone()),
        follow: false,
        from_offset: 0,
    };
    let mut out = Vec::new();
    let read = async {
        if let Ok(s) = c.executables().logs(req).await {
            let mut s = s.into_inner();
            while let Some(Ok(chunk)) = s.next().await {
                out.extend_from_slice(&chunk.data);
                if out.len() > (256 << 10) {
                    out.drain(..out.len() - (64 << 10));
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
    let text = String::from_utf8_lossy(&out);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LAST_LINES)..].join("\n");
    if tail.is_empty() {
        "(none)".into()
    } else {
        tail
    }
}
