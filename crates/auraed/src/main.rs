//! `auraed`: mode selection and wiring only.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use auraed::server::{ServerConfig, run};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// The Aurae daemon: runs workloads through one mTLS-authenticated gRPC API.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Directory with ca.pem, auraed.pem and auraed.key (create one with `aer pki init`).
    #[arg(long, env = "AURAED_PKI_DIR", default_value = "/etc/aurae/pki")]
    pki_dir: PathBuf,
    /// Unix socket to serve on (mode 0600, in a directory of mode 0700).
    #[arg(long, env = "AURAED_SOCKET", default_value = "/run/aurae/auraed.sock")]
    socket: PathBuf,
    /// Also serve on this TCP address (mTLS as on the socket), e.g. 127.0.0.1:8443.
    #[arg(long, env = "AURAED_LISTEN")]
    listen: Option<SocketAddr>,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP, no authentication:
    /// keep it on loopback), e.g. 127.0.0.1:9464. Off by default.
    #[arg(long, env = "AURAED_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Directory for auraed's durable state.
    #[arg(long, env = "AURAED_STATE_DIR", default_value = "/var/lib/aurae")]
    state_dir: PathBuf,
    /// Authorization policy (TOML). Default: the PKI's admin identity may do everything,
    /// nobody else anything.
    #[arg(long, env = "AURAED_POLICY")]
    policy: Option<PathBuf>,
    /// Seconds a client has to finish the TLS handshake.
    #[arg(long, default_value_t = 10)]
    handshake_timeout_s: u64,
    /// Most connections at once per listener (the Unix socket and TCP each get this
    /// many; pending handshakes count); one more is closed at once.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Most TLS handshakes in progress from one TCP peer address.
    #[arg(long, default_value_t = auraed::server::limits::MAX_HANDSHAKES_PER_PEER)]
    max_handshakes_per_peer: usize,
    /// Most established connections of one client identity (SPIFFE ID), both listeners
    /// together.
    #[arg(long, default_value_t = auraed::server::limits::MAX_CONNECTIONS_PER_IDENTITY)]
    max_connections_per_identity: usize,
    /// Most concurrent calls (HTTP/2 streams) per connection.
    #[arg(long, default_value_t = 128)]
    max_streams_per_connection: u32,
    /// cgroup v2 directory for cells [default: aurae below /sys/fs/cgroup or
    /// /sys/fs/cgroup/unified, whichever is cgroup2].
    #[arg(long, env = "AURAED_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// A registry (HOST or HOST:PORT) to reach over plain HTTP instead of HTTPS (repeatable).
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// Registry credentials (TOML: [[registry]] host, username, password; mode 0600).
    #[arg(long, env = "AURAED_REGISTRY_AUTH")]
    registry_auth: Option<PathBuf>,
    /// An extra CA bundle (PEM) for registries, besides the system roots.
    #[arg(long)]
    registry_ca: Option<PathBuf>,
    /// A host directory under which containers may mount volumes (repeatable). None =
    /// containers get no volumes.
    #[arg(long = "volume-root")]
    volume_roots: Vec<PathBuf>,
    /// A host directory VM kernels, initramfs images and drives may come from
    /// (repeatable). None = no virtual machines.
    #[arg(long = "vm-image-root")]
    vm_image_roots: Vec<PathBuf>,
    /// The kernel (bzImage or vmlinux) microVM instances boot (Spawn with VM isolation;
    /// probed once at start). Without it, instances are cell-isolated.
    #[arg(long, env = "AURAED_INSTANCE_KERNEL")]
    instance_kernel: Option<PathBuf>,
    /// A directory with the kernel modules the instance kernel needs (`order`, one module
    /// name per line, and `<name>.ko` files: virtio_mmio, virtio_net, bridge, veth, …).
    #[arg(long, env = "AURAED_INSTANCE_MODULES")]
    instance_modules: Option<PathBuf>,
    /// Run as a plain daemon even when started as PID 1 (e.g. in a container).
    #[arg(long)]
    no_pid1: bool,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn main() -> ExitCode {
    // The cell init is this binary re-executed (from a sealed copy) with a hidden mode.
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if raw
        .get(1)
        .is_some_and(|a| a == auraed::cell::init::INIT_ARG)
    {
        return auraed::cell::init::main(&raw[2..]);
    }
    // So is the VMM process of each virtual machine.
    if raw.get(1).is_some_and(|a| a == auraed::vm::vmm::VMM_ARG) {
        return auraed::vm::vmm::main();
    }
    // And the holder of the executables' output pipes (one per daemon, outlives a crash).
    if raw
        .get(1)
        .is_some_and(|a| a == auraed::workload::holder::HOLDER_ARG)
    {
        return auraed::workload::holder::holder_main();
    }
    // A spawned instance (cell-isolated): its parent hands it everything on fd 3.
    if raw
        .get(1)
        .is_some_and(|a| a == auraed::instance::handover::INSTANCE_ARG)
    {
        return run_instance();
    }
    // As PID 1 of a machine, the kernel's command line configures us, not flags (the
    // kernel may hand init arguments we do not know): never exit, never panic.
    if std::process::id() == 1 && !raw.iter().any(|a| a == "--no-pid1") {
        run_pid1();
    }
    let args = Args::parse();
    let filter = EnvFilter::try_from_env("AURAED_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if args.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        tracing::warn!("a rustls crypto provider was already installed");
    }
    let cfg = ServerConfig {
        pki_dir: args.pki_dir,
        socket: args.socket,
        listen: args.listen,
        state_dir: args.state_dir,
        policy: args.policy,
        handshake_timeout: Duration::from_secs(args.handshake_timeout_s.max(1)),
        max_connections: args.max_connections.max(1),
        max_handshakes_per_peer: args.max_handshakes_per_peer.max(1),
        max_connections_per_identity: args.max_connections_per_identity.max(1),
        max_streams_per_connection: args.max_streams_per_connection.max(1),
        cgroup_root: args.cgroup_root,
        warnings: Vec::new(),
        registry: auraed::image::registry::RegistryConfig {
            insecure: args.insecure_registries,
            extra_ca: args.registry_ca,
            credentials: match args
                .registry_auth
                .as_deref()
                .map(auraed::image::registry::load_credentials)
                .transpose()
            {
                Ok(c) => c.unwrap_or_default(),
                Err(e) => {
                    eprintln!("auraed: --registry-auth {e}");
                    return ExitCode::FAILURE;
                }
            },
            timeout: Duration::from_secs(30),
        },
        volume_roots: args.volume_roots,
        vm_image_roots: args.vm_image_roots,
        mode: "daemon",
        lineage: None,
        bridge_gateway: None,
        instance_kernel: args.instance_kernel,
        instance_modules: args.instance_modules,
        metrics_listen: args.metrics_listen,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cfg)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("auraed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A cell-isolated spawned instance: take the handover, set the cell up, serve.
fn run_instance() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let boot = match auraed::instance::child::prepare() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("auraed (instance): {e}");
            return ExitCode::FAILURE;
        }
    };
    let cfg = ServerConfig {
        pki_dir: boot.pki_dir,
        socket: boot.socket,
        listen: Some(boot.listen),
        state_dir: boot.state_dir,
        policy: Some(boot.policy),
        handshake_timeout: Duration::from_secs(10),
        max_connections: 1024,
        max_handshakes_per_peer: auraed::server::limits::MAX_HANDSHAKES_PER_PEER,
        max_connections_per_identity: auraed::server::limits::MAX_CONNECTIONS_PER_IDENTITY,
        max_streams_per_connection: 128,
        cgroup_root: Some(boot.cgroup_root),
        mode: "instance",
        warnings: boot.warnings,
        registry: auraed::image::registry::RegistryConfig {
            timeout: Duration::from_secs(30),
            ..Default::default()
        },
        volume_roots: Vec::new(),
        vm_image_roots: Vec::new(),
        lineage: Some(boot.lineage),
        bridge_gateway: Some(boot.bridge_gateway),
        instance_kernel: None,
        instance_modules: None,
        metrics_listen: None,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("auraed (instance): cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cfg)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("auraed (instance): {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// PID 1: set the machine up, serve until shutdown, then power off. Never returns.
fn run_pid1() -> ! {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let boot = auraed::pid1::prepare();
    if boot.probe {
        eprintln!("{}", auraed::instance::handover::PROBE_MARKER);
        auraed::pid1::power_off(false, "KVM probe");
    }
    tracing::info!(hostname = %boot.hostname, listen = ?boot.listen, warnings = boot.warnings.len(), "pid1: machine ready");
    let policy = PathBuf::from("/etc/aurae/policy.toml");
    let mut warnings = boot.warnings;
    let auth = PathBuf::from("/etc/aurae/registries.toml");
    let credentials = if auth.exists() {
        auraed::image::registry::load_credentials(&auth).unwrap_or_else(|e| {
            warnings.push(format!("registry credentials not loaded: {e}"));
            Default::default()
        })
    } else {
        Default::default()
    };
    let cfg = ServerConfig {
        pki_dir: PathBuf::from("/etc/aurae/pki"),
        socket: PathBuf::from("/run/aurae/auraed.sock"),
        listen: boot.listen,
        state_dir: PathBuf::from("/var/lib/aurae"),
        policy: policy.exists().then_some(policy),
        handshake_timeout: Duration::from_secs(10),
        max_connections: 1024,
        max_handshakes_per_peer: auraed::server::limits::MAX_HANDSHAKES_PER_PEER,
        max_connections_per_identity: auraed::server::limits::MAX_CONNECTIONS_PER_IDENTITY,
        max_streams_per_connection: 128,
        cgroup_root: Some(PathBuf::from("/sys/fs/cgroup/cells")),
        mode: "pid1",
        warnings,
        registry: auraed::image::registry::RegistryConfig {
            timeout: Duration::from_secs(30),
            credentials,
            ..Default::default()
        },
        volume_roots: Vec::new(),
        // The guest's own files: VMs nested in a PID 1 machine boot what it carries.
        vm_image_roots: vec![PathBuf::from("/var/lib/aurae/vm-images")],
        lineage: boot.lineage,
        bridge_gateway: boot.bridge_gateway,
        // What a PID 1 machine carries for its own microVM instances.
        instance_kernel: Some(PathBuf::from(auraed::pid1::INSTANCE_KERNEL)).filter(|p| p.exists()),
        instance_modules: Some(PathBuf::from(auraed::pid1::INSTANCE_MODULES))
            .filter(|p| p.exists()),
        metrics_listen: None,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => auraed::pid1::power_off(false, &format!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(run(cfg)) {
        Ok(reboot) => auraed::pid1::power_off(reboot, "shutdown requested"),
        Err(e) => auraed::pid1::power_off(false, &format!("auraed failed: {e:#}")),
    }
}
