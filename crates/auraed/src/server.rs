//! Listening: the Unix socket and optional TCP, TLS handshakes with mandatory client
//! certificates, connection limits, and the ordered shutdown.
//!
//! Each accepted connection is handshaken in its own task under a deadline; only a
//! connection whose client presented a CA-signed certificate with exactly one SPIFFE ID of
//! our trust domain reaches tonic, carrying that ID as its [`PeerInfo`].
//!
//! Budgets (see [`limits`]): each listener has its own slots, a TCP peer address has a cap
//! on handshakes in progress, a SPIFFE identity a cap on established connections; a
//! connection over any of them is closed at once.

pub mod ahead;
pub mod limits;
pub mod metrics;

use std::{
    fs, io,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use aurae_identity::{PkiPaths, SpiffeId, pki::ADMIN_PATH, tls};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::{debug, error, info, warn};

use crate::{
    api::{
        self, Context as ApiContext,
        authz::{AuthzLayer, PeerInfo, Transport},
    },
    identity::Policy,
    store::Store,
};

/// Everything `auraed` needs to serve; see `auraed --help`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub pki_dir: PathBuf,
    pub socket: PathBuf,
    pub listen: Option<SocketAddr>,
    pub state_dir: PathBuf,
    pub policy: Option<PathBuf>,
    pub handshake_timeout: Duration,
    /// Most connections at once, per listener (the Unix socket and TCP each have this
    /// many); pending handshakes count.
    pub max_connections: usize,
    /// Most TLS handshakes in progress from one TCP peer address.
    pub max_handshakes_per_peer: usize,
    /// Most established connections of one SPIFFE identity, both listeners together.
    pub max_connections_per_identity: usize,
    pub max_streams_per_connection: u32,
    /// Spare cell inits to keep ready (see [`crate::cell::pool`]); 0: none; `None`: the
    /// default for this cgroup hierarchy.
    pub cell_pool: Option<usize>,
    /// cgroup v2 directory under which cells are created; `None` = detect.
    pub cgroup_root: Option<PathBuf>,
    /// "daemon" or "pid1".
    pub mode: &'static str,
    /// Problems found before the API started (PID 1 set-up), reported by `Daemon/Info`.
    pub warnings: Vec<String>,
    /// How image pulls reach registries.
    pub registry: crate::image::registry::RegistryConfig,
    /// Host directories under which containers may have volumes (none = no volumes).
    pub volume_roots: Vec<PathBuf>,
    /// Host directories VM kernels, initramfs images and drives may come from.
    pub vm_image_roots: Vec<PathBuf>,
    /// Boot bzImages as given instead of from the ELF kept for them ([`crate::vm::kernels`]).
    pub vm_kernel_as_given: bool,
    /// Set when a parent spawned this auraed (see [`crate::instance`]).
    pub lineage: Option<crate::instance::handover::Lineage>,
    /// The gateway of the bridge for VMs and spawned instances (default 10.200.0.1).
    pub bridge_gateway: Option<std::net::Ipv4Addr>,
    /// The kernel microVM instances boot, and the modules it needs (`order` + `*.ko`).
    pub instance_kernel: Option<PathBuf>,
    pub instance_modules: Option<PathBuf>,
    /// Serve Prometheus metrics (plain HTTP, no authentication) on this address.
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the Kubernetes CRI on a Unix socket (see [`crate::cri`]).
    pub cri: Option<CriConfig>,
}

/// Where the CRI is served and who its calls are authorized as.
#[derive(Debug, Clone)]
pub struct CriConfig {
    pub socket: PathBuf,
    /// A SPIFFE ID; `None`: `spiffe://<auraed's trust domain>/cri`.
    pub identity: Option<String>,
    /// Where pod networks come from.
    pub cni: crate::cri::cni::CniConfig,
    /// Every sandbox's log directory must lie below it.
    pub log_root: PathBuf,
    /// Where the streaming server (Exec, PortForward) listens.
    pub stream_address: std::net::SocketAddr,
}

enum Io {
    Unix(TlsStream<UnixStream>),
    Tcp(TlsStream<TcpStream>),
}

/// A verified connection: TLS stream, peer identity, its slot in its listener's budget and
/// its identity's.
pub struct Conn {
    io: Io,
    peer: PeerInfo,
    _permit: OwnedSemaphorePermit,
    _identity_slot: limits::Held<SpiffeId>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Unix(s) => s.is_write_vectored(),
            Io::Tcp(s) => s.is_write_vectored(),
        }
    }
}

/// The SPIFFE ID the verifier already checked, read back from the session.
fn verified_peer<IO>(stream: &TlsStream<IO>) -> Option<SpiffeId> {
    let (_, session) = stream.get_ref();
    let cert = session.peer_certificates()?.first()?;
    tls::peer_spiffe_id(cert).ok()
}

/// cgroup2's filesystem magic number (statfs f_type).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

fn is_cgroup2(p: &Path) -> bool {
    nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
}

/// The cgroup v2 subtree for cells: `--cgroup-root`, else `aurae` below the first cgroup2
/// mount of `/sys/fs/cgroup` (pure v2) or `/sys/fs/cgroup/unified` (hybrid hosts).
fn open_cgroups(root: Option<&Path>) -> Result<Arc<crate::workload::cgroup::FsTree>, String> {
    let root = match root {
        Some(r) => r.to_owned(),
        None => ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .iter()
            .map(Path::new)
            .find(|p| is_cgroup2(p))
            .map(|p| p.join("aurae"))
            .ok_or(
                "no cgroup v2 hierarchy is mounted at /sys/fs/cgroup or /sys/fs/cgroup/unified",
            )?,
    };
    if let Some(parent) = root.parent()
        && !is_cgroup2(parent)
    {
        return Err(format!(
            "--cgroup-root {}: its parent is not on a cgroup2 filesystem",
            root.display()
        ));
    }
    crate::workload::cgroup::FsTree::open(&root)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// Runs auraed's API until SIGTERM/SIGINT or a Shutdown RPC, then shuts down in order.
/// Returns whether a reboot (rather than a power-off) was asked for.
pub async fn run(cfg: ServerConfig) -> anyhow::Result<bool> {
    // Where the start's time goes, said when auraed serves (a spawned instance's readiness
    // waits on all of it).
    let t0 = Instant::now();
    let ms = |t: Instant| t.saturating_duration_since(t0).as_millis() as u64;
    // Keys live in this memory, and every process it starts runs in it until its exec.
    if let Err(e) = aurae_sys::spawn::forbid_dumps() {
        warn!(error = %e, "could not make auraed not dumpable (PR_SET_DUMPABLE)");
    }
    let fd_limit = limits::raise_fd_limit();
    let listeners = if cfg.listen.is_some() { 2 } else { 1 };
    let per_listener = limits::budget_per_listener(cfg.max_connections, listeners, fd_limit);
    if per_listener < cfg.max_connections {
        warn!(
            fd_limit = ?fd_limit,
            max_connections = cfg.max_connections,
            per_listener,
            "the open-file limit cannot hold --max-connections per listener plus a reserve for \
             workloads: each listener gets {per_listener} connections (raise the hard \
             RLIMIT_NOFILE to allow more)"
        );
    }
    let (tls_config, server_id, policy, server_cert, identity_warnings) = load_identity(&cfg)?;
    let identity = Arc::new(crate::instance::identity::SelfIdentity::load(
        &cfg.pki_dir,
        server_id.clone(),
        Some(server_cert),
    ));
    let policy = policy.with_instance_signer(identity.signer_id.clone());
    let started_at = SystemTime::now();
    let identity_done = Instant::now();
    let (store, boot, read_only, boot_note) = open_state(&cfg, started_at)?;
    let state_done = Instant::now();

    api::prepare_socket(&cfg.socket, "--socket")?;
    let unix = UnixListener::bind(&cfg.socket)
        .with_context(|| format!("binding {}", cfg.socket.display()))?;
    fs::set_permissions(&cfg.socket, fs::Permissions::from_mode(0o600))?;
    let tcp = match cfg.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --listen {addr}"))?,
        ),
        None => None,
    };

    // Workloads: one reaper for every child, the cells, the event stream.
    if cfg.mode == "daemon"
        && let Err(e) = aurae_sys::process::set_child_subreaper()
    {
        warn!(
            "cannot become a child subreaper ({e}): orphans of workloads sharing auraed's PID namespace go to the host's init"
        );
    }
    // An instance template made some of what follows before its snapshot (`ahead`).
    let reaper = ahead::take_reaper().unwrap_or_default();
    tokio::spawn(reaper.clone().run());
    let reaper_for_cri = reaper.clone();
    let events = Arc::new(crate::events::EventBus::default());
    let mut warnings = cfg.warnings.clone();
    warnings.extend(identity_warnings);
    warnings.extend(read_only.clone());
    warnings.extend(boot_note);
    let (cells, vms, puller, instances) = wire_workloads(
        &cfg,
        &events,
        reaper,
        &store,
        read_only.is_some(),
        &mut warnings,
        identity.clone(),
    )
    .await?;
    let workloads_done = Instant::now();
    if let Some(l) = cfg.lineage.clone() {
        tokio::spawn(crate::instance::renew::renew_loop(identity.clone(), l));
    }
    if read_only.is_none() {
        tokio::spawn(instances.clone().probe_kvm());
    }
    cells.set_read_only(read_only);
    // Pods after their instances: a pod comes back only if its instance did.
    let pods = Arc::new(crate::pod::Pods::new(
        instances.clone(),
        events.clone(),
        Some(store.clone()),
    ));
    warnings.extend(pods.readopt());

    let (shutdown_tx, shutdown_rx) = watch::channel(None);
    let ctx = ApiContext {
        mode: cfg.mode,
        server_id: server_id.clone(),
        started_at,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1),
        cgroup_controllers: cells.controllers(),
        shutdown: Arc::new(shutdown_tx),
        cells: cells.clone(),
        events,
        reboot: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        warnings,
        puller,
        volume_roots: canonical_dirs(&cfg.volume_roots, "volume root"),
        vms: vms.clone(),
        quotas: Arc::new(api::quota::Quotas::new(
            cells.clone(),
            vms.clone(),
            instances.clone(),
        )),
        instances: instances.clone(),
        pods: pods.clone(),
        lineage: cfg.lineage.clone(),
    };
    let reboot = ctx.reboot.clone();
    let grpc_metrics = Arc::new(metrics::GrpcMetrics::new(
        api::served_methods().iter().map(String::as_str),
    ));
    if let Some(addr) = cfg.metrics_listen {
        let sources = metrics::Sources {
            cells: cells.clone(),
            vms: vms.clone(),
            instances: instances.clone(),
            pods: pods.clone(),
            grpc: grpc_metrics.clone(),
            started_at,
        };
        let bound = metrics::serve(addr, sources).await?;
        info!(metrics_listen = %bound, "serving Prometheus metrics at http://{bound}/metrics");
    }
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let reflection = match ahead::take_reflection() {
        Some(r) => r,
        None => api::reflection_routes()?,
    };
    let routes = api::routes(ctx.clone(), health, reflection);
    let policy = Arc::new(policy);
    let cri = match &cfg.cri {
        Some(c) => Some(
            start_cri(
                c,
                &policy,
                &ctx,
                &store,
                crate::cri::cni::Cni::new(c.cni.clone(), reaper_for_cri),
                &cfg.state_dir,
                shutdown_rx.clone(),
            )
            .await?,
        ),
        None => None,
    };
    for svc in [""].into_iter().chain(SERVICES) {
        health_reporter
            .set_service_status(svc, tonic_health::ServingStatus::Serving)
            .await;
    }

    let (conn_rx, accept_unix, accept_tcp, serve_on) =
        start_acceptors(&cfg, tls_config, unix, tcp, per_listener);
    instances.set_serve_on(serve_on);
    // Spare cell inits once we answer: filling the pool would otherwise compete with the
    // start (a microVM instance has one vCPU); a cell made before it is filled starts its
    // own init, as without a pool.
    cells.start_pool(cfg.cell_pool).await;

    info!(
        version = env!("CARGO_PKG_VERSION"),
        mode = cfg.mode,
        id = %server_id,
        socket = %cfg.socket.display(),
        listen = ?cfg.listen,
        max_connections_per_listener = per_listener,
        max_handshakes_per_peer = cfg.max_handshakes_per_peer,
        max_connections_per_identity = cfg.max_connections_per_identity,
        fd_limit = ?fd_limit,
        boots = boot.boots,
        start_ms = ms(Instant::now()),
        identity_ms = ms(identity_done),
        state_ms = ms(state_done).saturating_sub(ms(identity_done)),
        workloads_ms = ms(workloads_done).saturating_sub(ms(state_done)),
        "auraed is serving"
    );

    serve(
        &cfg,
        Api {
            policy,
            routes,
            grpc_metrics,
        },
        Running {
            conn_rx,
            health_reporter,
            shutdown_rx,
            accept_unix,
            accept_tcp,
            cells,
            vms,
            instances,
            pods,
            reboot,
            cri,
        },
    )
    .await
}

/// The CRI server (see [`crate::cri`]), its records re-adopted; it stops with the API.
async fn start_cri(
    c: &CriConfig,
    policy: &Arc<Policy>,
    ctx: &ApiContext,
    store: &Store,
    cni: crate::cri::cni::Cni,
    state_dir: &Path,
    shutdown: watch::Receiver<Option<Duration>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let id = match &c.identity {
        Some(s) => s
            .parse::<SpiffeId>()
            .map_err(|e| anyhow::anyhow!("--cri-identity {s:?}: {e}"))?,
        None => SpiffeId::new(ctx.server_id.trust_domain(), "/cri")?,
    };
    let allocate = format!("{}/Allocate", aurae_proto::service_names::CELLS);
    if policy.authorize(&id, &allocate).is_none() {
        warn!(cri_identity = %id, "the CRI identity has no grant for {allocate}: every sandbox kubelet asks for will be refused (grant it in the policy)");
    }
    let (cri, warnings) = crate::cri::Cri::new(
        id,
        policy.clone(),
        ctx.clone(),
        Some(store.clone()),
        state_dir.join("images"),
        cni,
        c.log_root.clone(),
    );
    for w in warnings {
        warn!("{w}");
    }
    cri.readopt().await;
    cri.start_streaming(c.stream_address, shutdown.clone())
        .await?;
    crate::cri::serve(c.socket.clone(), cri, shutdown).await
}

/// Verified connections, the accept loops (Unix socket, TCP) that make them, and a hook
/// that adds one more TCP listener (the bridge, for spawned instances).
type Acceptors = (
    mpsc::Receiver<Result<Conn, io::Error>>,
    tokio::task::JoinHandle<()>,
    Option<tokio::task::JoinHandle<()>>,
    crate::instance::ServeOn,
);

/// One accept loop per listener, each with its own connection budget; verified
/// connections come out of the returned channel.
fn start_acceptors(
    cfg: &ServerConfig,
    tls_config: rustls::ServerConfig,
    unix: UnixListener,
    tcp: Option<TcpListener>,
    per_listener: usize,
) -> Acceptors {
    let acceptor = TlsAcceptor::from(Arc::new(tls_config));
    let (conn_tx, conn_rx) = mpsc::channel::<Result<Conn, io::Error>>(64);
    let own_uid = nix::unistd::geteuid().as_raw();
    let shared = Shared {
        acceptor,
        handshake_timeout: cfg.handshake_timeout,
        per_identity: limits::PerKey::new(cfg.max_connections_per_identity),
        refusals: Arc::new(limits::Refusals::default()),
        out: conn_tx.clone(),
    };
    let accept_unix = tokio::spawn(accept_loop(
        Listener::Unix(unix, own_uid),
        Arc::new(Semaphore::new(per_listener)),
        None,
        shared.clone(),
    ));
    let accept_tcp = tcp.map(|l| {
        tokio::spawn(accept_loop(
            Listener::Tcp(l),
            Arc::new(Semaphore::new(per_listener)),
            Some(limits::PerKey::new(cfg.max_handshakes_per_peer)),
            shared.clone(),
        ))
    });
    let (budget, per_peer) = (per_listener, cfg.max_handshakes_per_peer);
    let serve_on: crate::instance::ServeOn = Arc::new(move |l: std::net::TcpListener| {
        let listener = match l
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(l))
        {
            Ok(l) => l,
            Err(e) => {
                warn!("an extra listener could not be served: {e}");
                return;
            }
        };
        tokio::spawn(accept_loop(
            Listener::Tcp(listener),
            Arc::new(Semaphore::new(budget)),
            Some(limits::PerKey::new(per_peer)),
            shared.clone(),
        ));
    });
    drop(conn_tx);
    (conn_rx, accept_unix, accept_tcp, serve_on)
}

/// The TLS configuration, auraed's own SPIFFE ID, the policy, and what to warn about
/// them (an expired certificate, a policy that grants nothing). auraed never needs the
/// CA key: it refuses to start next to it.
type Identity = (
    rustls::ServerConfig,
    SpiffeId,
    Policy,
    Arc<aurae_identity::tls::ServerCert>,
    Vec<String>,
);

fn load_identity(cfg: &ServerConfig) -> anyhow::Result<Identity> {
    let pki = PkiPaths::new(&cfg.pki_dir);
    pki.refuse_ca_key()?;
    for f in [&pki.ca_cert, &pki.server_cert, &pki.server_key] {
        if !f.exists() {
            bail!(
                "{} is missing: auraed needs the CA certificate and its own identity in --pki-dir. \
                 Create a development PKI with `aer pki init --dir {}`",
                f.display(),
                cfg.pki_dir.display()
            );
        }
    }
    // Chains to ca.pem, one SPIFFE ID of the CA's trust domain, the key matches.
    let own = crate::identity::own::check(&pki)?;
    let mut warnings = own.warnings;
    // What the check loaded serves the TLS configuration: each file read and the key
    // parsed once.
    let (tls_config, server_id, server_cert) = tls::server_config_with(own.ca, own.own)?;
    let trust_domain = server_id.trust_domain().to_owned();
    let methods = api::served_methods();
    let policy = match &cfg.policy {
        Some(p) => Policy::load(p, &trust_domain, methods)?,
        None => Policy::default_for(SpiffeId::new(&trust_domain, ADMIN_PATH)?),
    };
    for g in policy.grants() {
        let (m, n) = g.describe();
        info!(id = %g.id, methods = ?m, names = ?n, "policy grant");
    }
    let origin = cfg.policy.as_deref().unwrap_or(Path::new("(default)"));
    warnings.extend(policy.grants_nothing(&origin.display().to_string()));
    for w in &warnings {
        warn!("{w}");
    }
    Ok((tls_config, server_id, policy, server_cert, warnings))
}

/// The state store (locked: one auraed per state directory) and this start's boot
/// record. A state disk that takes no writes (full) still lets auraed start: it serves
/// what runs, takes no new work, and says why (the third value); an unreadable boot
/// record is quarantined and said so (the fourth).
fn open_state(
    cfg: &ServerConfig,
    started_at: SystemTime,
) -> anyhow::Result<(
    Store,
    crate::store::BootRecord,
    Option<String>,
    Option<String>,
)> {
    let store = Store::open(&cfg.state_dir)?;
    let epoch = started_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match store.record_boot(env!("CARGO_PKG_VERSION"), std::process::id(), epoch) {
        Ok((b, note)) => {
            if let Some(n) = &note {
                warn!("{n}");
            }
            Ok((store, b, None, note))
        }
        Err(e) => {
            let why = format!(
                "the state directory {} takes no writes ({e}): auraed serves what runs but takes no new work until there is room (then restart it)",
                cfg.state_dir.display()
            );
            warn!("{why}");
            Ok((store, crate::store::BootRecord::default(), Some(why), None))
        }
    }
}

/// What the API is: who may call what, and the services.
struct Api {
    policy: Arc<Policy>,
    routes: tonic::service::Routes,
    /// Counts every call, refused ones included (outside the authorization layer).
    grpc_metrics: Arc<metrics::GrpcMetrics>,
}

/// What is running once auraed serves.
struct Running {
    conn_rx: mpsc::Receiver<Result<Conn, io::Error>>,
    health_reporter: tonic_health::server::HealthReporter,
    shutdown_rx: watch::Receiver<Option<Duration>>,
    accept_unix: tokio::task::JoinHandle<()>,
    accept_tcp: Option<tokio::task::JoinHandle<()>>,
    cells: Arc<crate::cell::Cells>,
    vms: Arc<crate::vm::Vms>,
    instances: Arc<crate::instance::Instances>,
    pods: Arc<crate::pod::Pods>,
    reboot: Arc<std::sync::atomic::AtomicBool>,
    /// The CRI server, when one was asked for.
    cri: Option<tokio::task::JoinHandle<()>>,
}

/// Serves until a signal or a Shutdown RPC, then stops workloads (VMs, then cells: every
/// cell at once), drains calls in flight for the grace period and removes the socket.
async fn serve(cfg: &ServerConfig, api: Api, run: Running) -> anyhow::Result<bool> {
    let Running {
        conn_rx,
        health_reporter,
        mut shutdown_rx,
        accept_unix,
        accept_tcp,
        cells,
        vms,
        instances,
        pods,
        reboot,
        cri,
    } = run;
    let Api {
        policy,
        routes,
        grpc_metrics,
    } = api;
    let signal = async move {
        let grace = wait_for_shutdown(&mut shutdown_rx).await;
        for svc in [""].into_iter().chain(SERVICES) {
            health_reporter
                .set_service_status(svc, tonic_health::ServingStatus::NotServing)
                .await;
        }
        grace
    };
    let (grace_tx, grace_rx) = tokio::sync::oneshot::channel();
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(cfg.max_streams_per_connection))
        .concurrency_limit_per_connection(cfg.max_streams_per_connection as usize)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .http2_max_header_list_size(Some(16 * 1024))
        .timeout(crate::spec::MAX_GRACE + Duration::from_secs(60))
        .layer(metrics::GrpcMetricsLayer::new(grpc_metrics))
        .layer(AuthzLayer::new(policy))
        .add_routes(routes)
        .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), async move {
            let grace = signal.await;
            let _ = grace_tx.send(grace);
        });
    let mut server = tokio::spawn(server);
    let mut grace_rx = grace_rx;
    let mut workloads_stopped = false;
    let outcome = tokio::select! {
        r = &mut server => r,
        grace = &mut grace_rx => {
            let grace = grace.unwrap_or(crate::spec::DEFAULT_GRACE);
            info!(grace_s = grace.as_secs_f64(), "shutting down: no new connections; stopping workloads; draining calls in flight");
            instances.shutdown(grace).await;
            pods.forget_all();
            vms.shutdown(grace).await;
            cells.shutdown(grace).await;
            workloads_stopped = true;
            accept_unix.abort();
            if let Some(t) = &accept_tcp { t.abort(); }
            match tokio::time::timeout(grace, &mut server).await {
                Ok(r) => r,
                Err(_) => {
                    warn!("calls still in flight after the grace period; closing them");
                    server.abort();
                    Ok(Ok(()))
                }
            }
        }
    };
    // The server may finish first (no connection was open when the signal came): the
    // workloads are stopped in order all the same.
    if !workloads_stopped {
        let grace = grace_rx.try_recv().unwrap_or(crate::spec::DEFAULT_GRACE);
        info!(grace_s = grace.as_secs_f64(), "stopping workloads");
        instances.shutdown(grace).await;
        pods.forget_all();
        vms.shutdown(grace).await;
        cells.shutdown(grace).await;
    }
    accept_unix.abort();
    if let Some(t) = accept_tcp {
        t.abort();
    }
    if let Some(t) = cri
        && tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .is_err()
    {
        warn!("the CRI server did not stop within 5 s");
    }
    if let Err(e) = fs::remove_file(&cfg.socket) {
        warn!(socket = %cfg.socket.display(), "could not remove the socket: {e}");
    }
    match outcome {
        Ok(Ok(())) => {
            info!("auraed stopped");
            Ok(reboot.load(std::sync::atomic::Ordering::SeqCst))
        }
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(anyhow::anyhow!("server task failed: {e}")),
    }
}

/// Health service names, besides the overall "".
const SERVICES: [&str; 9] = [
    aurae_proto::service_names::IMAGES,
    aurae_proto::service_names::RUNTIME,
    aurae_proto::service_names::EXECUTABLES,
    aurae_proto::service_names::CELLS,
    aurae_proto::service_names::VIRTUAL_MACHINES,
    aurae_proto::service_names::INSTANCES,
    aurae_proto::service_names::PODS,
    aurae_proto::service_names::EVENTS,
    aurae_proto::service_names::DAEMON,
];

/// How often a connection that has been quiet that long is pinged (HTTP/2 PING).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long auraed waits for a ping's answer before it closes the connection (and fails
/// every call on it). Generous, as its own connections to spawned instances are
/// (`aurae_client::KEEPALIVE_TIMEOUT`): what misses this deadline is auraed on a busy
/// machine reading the answer late, not the client. With 10 s a guest-tier auraed (PID 1 of
/// a QEMU TCG machine booting a nested microVM and decompressing its kernel) closed a
/// healthy client's connection in the middle of a five-minute `Wait` (CI, 2026-12-05).
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Resolves with the grace period on SIGTERM, SIGINT or a Shutdown RPC.
async fn wait_for_shutdown(rx: &mut watch::Receiver<Option<Duration>>) -> Duration {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            error!("cannot install SIGTERM/SIGINT handlers; only the Shutdown RPC can stop auraed");
            loop {
                if rx.changed().await.is_err() {
                    return crate::spec::DEFAULT_GRACE;
                }
                if let Some(g) = *rx.borrow() {
                    return g;
                }
            }
        }
    };
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM"); return crate::spec::DEFAULT_GRACE; }
            _ = int.recv() => { info!("SIGINT"); return crate::spec::DEFAULT_GRACE; }
            changed = rx.changed() => {
                if changed.is_err() { return crate::spec::DEFAULT_GRACE; }
                if let Some(g) = *rx.borrow() { return g; }
            }
        }
    }
}

enum Listener {
    /// With auraed's own uid: only it and root may connect (checked by SO_PEERCRED).
    Unix(UnixListener, u32),
    Tcp(TcpListener),
}

/// What every accept loop shares.
#[derive(Clone)]
struct Shared {
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    /// Established connections per verified identity, both listeners together.
    per_identity: Arc<limits::PerKey<SpiffeId>>,
    refusals: Arc<limits::Refusals>,
    out: mpsc::Sender<Result<Conn, io::Error>>,
}

/// Accepts forever: a connection gets a slot of `budget` (its listener's) at once or is
/// closed at once; a TCP one also needs a handshake slot of its peer address. Failed
/// accepts (EMFILE included) pause briefly and never end the loop.
async fn accept_loop(
    listener: Listener,
    budget: Arc<Semaphore>,
    per_peer: Option<Arc<limits::PerKey<std::net::IpAddr>>>,
    shared: Shared,
) {
    let refusals = shared.refusals.clone();
    loop {
        let accepted = match &listener {
            Listener::Unix(l, own_uid) => l.accept().await.map(|(s, _)| {
                let cred = s.peer_cred().ok();
                let uid = cred.map_or(u32::MAX, |c| c.uid());
                let pid = cred.and_then(|c| c.pid());
                (
                    Pending::Unix(s, uid == 0 || uid == *own_uid),
                    Transport::Unix { uid, pid },
                )
            }),
            Listener::Tcp(l) => l.accept().await.map(|(s, addr)| {
                let _ = s.set_nodelay(true);
                (Pending::Tcp(s), Transport::Tcp(addr))
            }),
        };
        let (pending, transport) = match accepted {
            Ok(x) => x,
            Err(e) => {
                match limits::classify_accept_error(&e) {
                    limits::AcceptError::Transient => debug!("accept: {e}"),
                    limits::AcceptError::BackOff(pause) => {
                        if let Some(n) = refusals.accept_failed.admit() {
                            if crate::api::status::is_out_of_fds(&e) {
                                warn!(
                                    similar_not_logged = n,
                                    "accept failed: {e}: out of file descriptors; pausing {} ms and serving on \
                                     (raise RLIMIT_NOFILE or lower --max-connections)",
                                    pause.as_millis()
                                );
                            } else {
                                warn!(
                                    similar_not_logged = n,
                                    "accept failed: {e}; pausing {} ms",
                                    pause.as_millis()
                                );
                            }
                        }
                        tokio::time::sleep(pause).await;
                    }
                }
                continue;
            }
        };
        // Over budget: closed at once (dropping the stream), never queued.
        let Ok(permit) = budget.clone().try_acquire_owned() else {
            drop(pending);
            refusals.refuse(
                &refusals.listener_full,
                &transport,
                "this listener's connection budget (--max-connections) is used up",
            );
            continue;
        };
        let peer_slot = match (&per_peer, &transport) {
            (Some(per_peer), Transport::Tcp(addr)) => match per_peer.try_take(addr.ip()) {
                Some(slot) => Some(slot),
                None => {
                    drop(pending);
                    refusals.refuse(
                        &refusals.peer_handshakes,
                        &transport,
                        &format!(
                            "this address already has {} TLS handshakes in progress (--max-handshakes-per-peer)",
                            per_peer.cap()
                        ),
                    );
                    continue;
                }
            },
            _ => None,
        };
        tokio::spawn(handshake(
            pending,
            transport,
            permit,
            peer_slot,
            shared.clone(),
        ));
    }
}

/// Handshakes one connection under the deadline; a verified one within its identity's cap
/// goes to tonic.
async fn handshake(
    pending: Pending,
    transport: Transport,
    permit: OwnedSemaphorePermit,
    peer_slot: Option<limits::Held<std::net::IpAddr>>,
    shared: Shared,
) {
    let acceptor = shared.acceptor.clone();
    let handshake = async {
        match pending {
            Pending::Unix(_, false) => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "peer uid is neither root nor auraed's own",
            )),
            Pending::Unix(s, true) => acceptor.accept(s).await.map(Io::Unix),
            Pending::Tcp(s) => acceptor.accept(s).await.map(Io::Tcp),
        }
    };
    let io = match tokio::time::timeout(shared.handshake_timeout, handshake).await {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => {
            warn!(target: "aurae::audit", via = %transport, decision = "reject", "TLS handshake rejected: {e}");
            return;
        }
        Err(_) => {
            warn!(target: "aurae::audit", via = %transport, decision = "reject", "TLS handshake timed out");
            return;
        }
    };
    // The handshake is over: the peer address's slot is free for the next one.
    drop(peer_slot);
    let id = match &io {
        Io::Unix(s) => verified_peer(s),
        Io::Tcp(s) => verified_peer(s),
    };
    let Some(id) = id else {
        warn!(via = %transport, "handshake finished without a verified SPIFFE ID; closing");
        return;
    };
    let Some(identity_slot) = shared.per_identity.try_take(id.clone()) else {
        drop(io);
        let refusals = &shared.refusals;
        refusals.refuse(
            &refusals.identity_full,
            &format_args!("{transport} peer_id={id}"),
            &format!(
                "this identity already has {} connections open (--max-connections-per-identity)",
                shared.per_identity.cap()
            ),
        );
        return;
    };
    debug!(peer_id = %id, via = %transport, "connection verified");
    let conn = Conn {
        io,
        peer: PeerInfo { id, transport },
        _permit: permit,
        _identity_slot: identity_slot,
    };
    let _ = shared.out.send(Ok(conn)).await;
}

enum Pending {
    /// The stream, and whether SO_PEERCRED allowed the peer.
    Unix(UnixStream, bool),
    Tcp(TcpStream),
}

/// The workload services: the cgroup tree, VMs, cells (with what a previous auraed left
/// re-adopted from its records, and the rest swept), the image store and puller. What
/// could not be kept or read is added to `warnings` (Daemon/Info) and emitted as events.
async fn wire_workloads(
    cfg: &ServerConfig,
    events: &Arc<crate::events::EventBus>,
    reaper: Arc<crate::reaper::Reaper>,
    store: &Store,
    read_only: bool,
    warnings: &mut Vec<String>,
    identity: Arc<crate::instance::identity::SelfIdentity>,
) -> anyhow::Result<(
    Arc<crate::cell::Cells>,
    Arc<crate::vm::Vms>,
    Arc<crate::image::pull::Puller>,
    Arc<crate::instance::Instances>,
)> {
    use aurae_proto::runtime::v0::{EventType, Kind};
    let tree = open_cgroups(cfg.cgroup_root.as_deref());
    match &tree {
        Ok(t) => {
            info!(root = %t.root().display(), controllers = ?crate::workload::cgroup::CgroupTree::controllers(t.as_ref()), "cells use cgroup v2")
        }
        Err(reason) => warn!("cells are unavailable: {reason}"),
    }
    let fs_tree = tree.as_ref().ok().cloned();
    let tree = tree.map(|t| t as Arc<dyn crate::workload::cgroup::CgroupTree>);
    let image_store = Arc::new(crate::image::store::ImageStore::open(&cfg.state_dir)?);
    for q in image_store.checked_refs().1 {
        warnings.push(format!(
            "image reference record {q} is unreadable and quarantined in {}: image garbage collection is off until it is removed",
            image_store.quarantine_dir().display()
        ));
    }
    let sealed = Arc::new(aurae_sys::memfd::SealedSelf::default());
    let (tree_for_vms, reaper_for_vms, sealed_for_vms) =
        (tree.clone(), reaper.clone(), sealed.clone());
    let (tree_for_instances, reaper_for_instances, sealed_for_instances) =
        (tree.clone(), reaper.clone(), sealed.clone());
    let containers = private_dir(&cfg.state_dir, "containers")?;
    // Where freed containers' directories are deleted from; what a previous auraed left
    // there is deleted now (whatever its records say: nothing in it is in use).
    let removed = private_dir(&cfg.state_dir, "containers-removed")?;
    warnings.extend(crate::container::remove_all_but(
        &removed,
        &[],
        "freed container directory",
    ));
    let cell_dirs = crate::cell::dirs::CellDirs::new(private_dir(&cfg.state_dir, "cell-dirs")?);
    // The output holder: keeps copies of executables' pipes so a crash of auraed never
    // SIGPIPEs them. Without it workloads still run, but their output dies with auraed.
    // On a state disk that takes no writes no holder is started: whatever a previous
    // holder keeps stays with it (its records cannot be rewritten to name another).
    // One made ahead of a template's snapshot is tracked by the reaper made with it.
    let holder_made_ahead = ahead::take_holder();
    let holder = if read_only {
        if let Some(h) = holder_made_ahead
            && let Err(e) = h.kill()
        {
            warnings.push(format!(
                "the output holder made ahead could not be stopped: {e}"
            ));
        }
        None
    } else if let Some(h) = holder_made_ahead.and_then(|h| match h.answers() {
        Ok(()) => Some(h.in_this_boot()),
        Err(e) => {
            let _ = h.kill();
            warnings.push(format!(
                "the output holder made ahead does not answer ({e}): another is started"
            ));
            None
        }
    }) {
        Some(Arc::new(h))
    } else {
        let (sealed, reaper) = (sealed.clone(), reaper.clone());
        match tokio::task::spawn_blocking(move || {
            crate::workload::holder::Holder::start(&sealed, &reaper)
        })
        .await
        {
            Ok(Ok(h)) => Some(Arc::new(h)),
            Ok(Err(e)) => {
                warnings.push(format!(
                    "the output holder did not start ({e}): executables' output will not survive a crash of auraed"
                ));
                None
            }
            Err(e) => {
                warnings.push(format!("the output holder did not start: {e}"));
                None
            }
        }
    };
    let cells = Arc::new(crate::cell::Cells::new(crate::cell::registry::CellsDeps {
        tree,
        spawner: Arc::new(crate::cell::zygote::ZygoteSpawner::new(reaper)),
        events: events.clone(),
        logs_dir: cfg.state_dir.join("logs"),
        containers_dir: containers.clone(),
        cell_dirs: cell_dirs.clone(),
        sealed,
        store: Some(store.clone()),
        images: Some(image_store.clone()),
        holder: holder.clone(),
    }));
    // A previous auraed's cells are served again where their records say how; whatever
    // else it left under the cgroup root is killed and removed, each one reported.
    let vms = crate::vm::Vms::new(
        tree_for_vms,
        reaper_for_vms,
        events.clone(),
        cfg.state_dir.join("logs"),
        canonical_dirs(&cfg.vm_image_roots, "VM image root"),
        sealed_for_vms,
    )
    .with_bridge_gateway(
        cfg.bridge_gateway
            .unwrap_or(std::net::Ipv4Addr::new(10, 200, 0, 1)),
    )
    .with_records(Some(store.clone()), holder.clone())
    .with_snapshots(cfg.state_dir.join("vm-snapshots"));
    let vms = Arc::new(if cfg.vm_kernel_as_given {
        vms
    } else {
        vms.with_kernel_elfs(cfg.state_dir.join(crate::vm::kernels::DIR))
    });
    let instances = Arc::new(crate::instance::Instances::new(
        crate::instance::InstancesDeps {
            tree: tree_for_instances,
            reaper: reaper_for_instances,
            events: events.clone(),
            vms: vms.clone(),
            sealed: sealed_for_instances,
            identity,
            logs_dir: cfg.state_dir.join("logs"),
            lineage: cfg.lineage.clone(),
            store: Some(store.clone()),
            kernel: cfg.instance_kernel.clone(),
            modules: cfg.instance_modules.clone(),
            templates_dir: cfg.state_dir.join(crate::instance::template::DIR),
        },
    ));
    let found_vms = vms.readopt().await;
    let found_instances = instances.readopt();
    for w in found_instances.warnings {
        events.emit(Kind::Instance, "", EventType::Failed, w.clone());
        warnings.push(w);
    }
    let found = cells.readopt().await;
    for w in found_vms.warnings {
        events.emit(Kind::VirtualMachine, "", EventType::Failed, w.clone());
        warnings.push(w);
    }
    // Old holders go once nothing of ours needs what they keep.
    let mut old_holders = found.old_holders.clone();
    old_holders.extend(found_vms.old_holders);
    old_holders.sort_by_key(|h| (h.pid, h.start_time));
    old_holders.dedup();
    for h in old_holders
        .iter()
        .filter(|h| !cells.holds_with(h) && !vms.holds_with(h))
    {
        if let Err(e) = crate::workload::holder::retire(h) {
            warnings.push(format!(
                "the output holder (pid {}) of a previous auraed could not be stopped: {e}",
                h.pid
            ));
        }
    }
    if !found.cells.is_empty() || found.executables > 0 {
        info!(
            cells = found.cells.len(),
            executables = found.executables,
            ended_while_down = found.ended,
            "re-adopted what the previous auraed ran"
        );
    }
    for w in found.warnings {
        events.emit(Kind::Cell, "", EventType::Failed, w.clone());
        warnings.push(w);
    }
    if let Some(t) = &fs_tree {
        for w in t.sweep_leftovers(&|name| {
            found.cells.contains(name)
                || found.own_groups.contains(name)
                || found_vms.cgroups.contains(name)
                || found_instances.cgroups.contains(name)
                // The pool's own start removes its group (its spares left with the
                // previous auraed: nothing to warn about).
                || name == crate::workload::layout::POOL_GROUP
        }) {
            events.emit(Kind::Cell, "", EventType::Freed, w.clone());
            warnings.push(w);
        }
    }
    // The previous auraed's holder may hold nothing that was taken back (it had no
    // running executables): retire it by its record, then record ours. Only once the
    // records were read and acted on: without them (no cgroup tree) nothing was taken
    // back, and retiring it would close the last read end of every surviving workload's
    // pipes; it stays recorded for the next start that reads them.
    let old_holder = match store
        .get::<crate::workload::holder::ProcRef>(crate::store::kinds::DAEMON, "holder")
    {
        Ok(old) => old,
        Err(e) => {
            warnings.push(format!(
                "the record of a previous auraed's output holder is unreadable ({e}): that holder, if it still runs, is not stopped"
            ));
            None
        }
    };
    if let Some(old) = &old_holder
        && let Some(h) = &holder
        && h.proc() != *old
    {
        if !found.ran {
            warnings.push(format!(
                "the output holder (pid {}) of a previous auraed is kept: its records were not read (no cgroup tree)",
                old.pid
            ));
        } else if !cells.holds_with(old)
            && !vms.holds_with(old)
            && let Err(e) = crate::workload::holder::retire(old)
        {
            warnings.push(format!(
                "the output holder (pid {}) of a previous auraed could not be stopped: {e}",
                old.pid
            ));
        }
    }
    if let Some(h) = &holder
        && (found.ran || old_holder.is_none())
        && let Err(e) = store.put(crate::store::kinds::DAEMON, "holder", &h.proc())
    {
        warnings.push(format!("recording the output holder: {e}"));
    }
    if found.ran {
        warnings.extend(crate::container::remove_all_but(
            &containers,
            &cells.container_dirs(),
            "container directory",
        ));
        // Directories of cells that were not found again (a crash between a free's steps).
        warnings.extend(cell_dirs.remove_strays(&|rel| found.cells.contains(rel)));
    } else if [&containers, cell_dirs.root()]
        .iter()
        .any(|d| std::fs::read_dir(d).is_ok_and(|mut r| r.next().is_some()))
    {
        warnings.push(
            "the records of a previous auraed were not read (no cgroup tree): its containers' and cells' directories are kept"
                .into(),
        );
    }
    // Logs of cells and VMs that were not found again (a crash between a free's steps,
    // or a start that never got its record) go too — only once the records were read:
    // without them every cell's logs would look stray.
    let logs = cfg.state_dir.join("logs");
    let instances_dir = format!("{}/", crate::workload::layout::INSTANCE_GROUP);
    let kept_logs = |rel: &str| {
        if !found.ran {
            return true;
        }
        if let Some(i) = rel.strip_prefix(&instances_dir) {
            return instances.holds_log(i);
        }
        match rel.strip_prefix(&format!("{}/", crate::workload::layout::VM_GROUP)) {
            Some(vm) => vms.holds_log(vm),
            None => {
                rel == crate::workload::layout::VM_GROUP
                    || rel == crate::workload::layout::INSTANCE_GROUP
                    || found.cells.contains(rel)
            }
        }
    };
    warnings.extend(remove_stray_logs(&logs, &kept_logs));
    let puller = Arc::new(crate::image::pull::Puller {
        store: image_store,
        registry: crate::image::registry::Registry::new(cfg.registry.clone()),
        limits: crate::image::unpack::Limits::default(),
        timeout: cfg.registry.timeout,
    });
    Ok((cells, vms, puller, instances))
}

/// Removes what under `dir` (auraed's logs) `kept` does not keep, by path relative to
/// `dir` (a cell's directory `a/b`, a VM's log `vms/<name>.log`); it goes into the
/// directories it keeps. One warning per entry that cannot be removed.
fn remove_stray_logs(dir: &std::path::Path, kept: &dyn Fn(&str) -> bool) -> Vec<String> {
    let mut warnings = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, prefix)) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let base = e.file_name().to_string_lossy().into_owned();
            let rel = if prefix.is_empty() {
                base
            } else {
                format!("{prefix}/{base}")
            };
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            // Inside a kept cell, its executables' files stay (freed with the cell).
            if !is_dir && !prefix.is_empty() && prefix != crate::workload::layout::VM_GROUP {
                continue;
            }
            if kept(&rel) {
                if is_dir {
                    stack.push((e.path(), rel));
                }
                continue;
            }
            let removed = if is_dir {
                std::fs::remove_dir_all(e.path())
            } else {
                std::fs::remove_file(e.path())
            };
            if let Err(err) = removed {
                warnings.push(format!(
                    "log {} left by a previous auraed could not be removed: {err}",
                    e.path().display()
                ));
            }
        }
    }
    warnings
}

/// `<state>/<name>`, made 0700 if missing: `containers` (upper directories hold the
/// containers' files; what no re-adopted container uses is removed after re-adoption,
/// [`crate::container::remove_all_but`]), `containers-removed` (freed containers' directories
/// being deleted, see [`crate::container::removed_dir`]) and `cell-dirs` (see
/// [`crate::cell::dirs`]).
fn private_dir(state: &std::path::Path, name: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = state.join(name);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}

/// The canonical forms of `dirs` that are directories; the others are logged and skipped.
fn canonical_dirs(dirs: &[PathBuf], what: &str) -> Vec<PathBuf> {
    dirs.iter()
        .filter_map(|r| match std::fs::canonicalize(r) {
            Ok(c) if c.is_dir() => Some(c),
            _ => {
                warn!(root = %r.display(), "{what} is not a directory: ignored");
                None
            }
        })
        .collect()
}
