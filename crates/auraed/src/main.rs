//! `auraed`: mode selection and wiring only.
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use auraed::{
    config::FileConfig,
    server::{ServerConfig, run},
};
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, parser::ValueSource};
use tracing_subscriber::EnvFilter;

/// How relative paths and the config file combine with flags (the end of `--help`).
const PATHS_HELP: &str = "\
Every option can also be set in the --config file (TOML), under its long name in snake_case: \
--state-dir is state_dir = \"/var/lib/aurae\", --insecure-registry is a list, \
insecure_registry = [\"127.0.0.1:5000\"], a switch is no_pid1 = true. A flag wins over its \
environment variable, which wins over the file, which wins over the default.

Relative paths: a path given as a flag or an environment variable is taken from the working \
directory; a path in the config file from the file's own directory. auraed makes every path \
absolute once, at start, and refuses one that cannot be (an empty path, an unreadable working \
directory).";

/// The Aurae daemon: runs workloads through one mTLS-authenticated gRPC API.
#[derive(Debug, Parser)]
#[command(version, about, after_help = PATHS_HELP)]
struct Args {
    /// A TOML file with any of these options (see below), e.g. /etc/aurae/auraed.toml.
    #[arg(long, env = "AURAED_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory with ca.pem, auraed.pem and auraed.key (create one with `aer pki init`),
    /// e.g. /etc/aurae/pki.
    #[arg(long, env = "AURAED_PKI_DIR", default_value = "/etc/aurae/pki")]
    pki_dir: PathBuf,
    /// Unix socket to serve on (mode 0600, in a directory of mode 0700), e.g.
    /// /run/aurae/auraed.sock.
    #[arg(long, env = "AURAED_SOCKET", default_value = "/run/aurae/auraed.sock")]
    socket: PathBuf,
    /// Also serve on this TCP address (mTLS as on the socket), e.g. 127.0.0.1:8443.
    #[arg(long, env = "AURAED_LISTEN")]
    listen: Option<SocketAddr>,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP, no authentication:
    /// keep it on loopback), e.g. 127.0.0.1:9464. Off by default.
    #[arg(long, env = "AURAED_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Serve the Kubernetes CRI (runtime.v1, for kubelet) on this Unix socket, plain gRPC
    /// (mode 0600 in a 0700 directory; only peers running as auraed's uid are served),
    /// e.g. /run/aurae/cri.sock. Unset: no CRI.
    #[arg(long)]
    cri_socket: Option<PathBuf>,
    /// The SPIFFE ID CRI calls are authorized as: its grant in the policy decides what
    /// kubelet may do, e.g. spiffe://aurae.local/cri [default: spiffe://<auraed's trust
    /// domain>/cri].
    #[arg(long)]
    cri_identity: Option<String>,
    /// Where CRI pod networks are configured: the first CNI configuration here (lexical
    /// order; .conflist, .conf or .json) is used for every sandbox, e.g. /etc/cni/net.d.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// The directory every CRI sandbox's log directory must lie below (kubelet's pod
    /// logs), e.g. /var/log/pods.
    #[arg(long, default_value = "/var/log/pods")]
    cri_log_root: PathBuf,
    /// Where the CRI streaming server (the URLs Exec and PortForward answer, which kubelet
    /// proxies to) listens, plain HTTP upgraded to SPDY; each URL carries a one-time
    /// token, e.g. 127.0.0.1:10010 (port 0: one the kernel picks).
    #[arg(long, default_value = "127.0.0.1:0")]
    cri_stream_address: SocketAddr,
    /// A directory CNI plugins are run from (repeatable, searched in order), e.g.
    /// /usr/lib/cni [default: /opt/cni/bin and /usr/lib/cni].
    #[arg(long = "cni-bin-dir")]
    cni_bin_dirs: Vec<PathBuf>,
    /// Directory for auraed's durable state, e.g. /var/lib/aurae.
    #[arg(long, env = "AURAED_STATE_DIR", default_value = "/var/lib/aurae")]
    state_dir: PathBuf,
    /// Authorization policy (TOML), e.g. /etc/aurae/policy.toml. Default: the PKI's admin
    /// identity may do everything, nobody else anything.
    #[arg(long, env = "AURAED_POLICY")]
    policy: Option<PathBuf>,
    /// Seconds a client has to finish the TLS handshake, e.g. 10.
    #[arg(long, default_value_t = 10)]
    handshake_timeout_s: u64,
    /// Most connections at once per listener (the Unix socket and TCP each get this
    /// many; pending handshakes count); one more is closed at once. A count, e.g. 1024.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Most TLS handshakes in progress from one TCP peer address. A count, e.g. 64.
    #[arg(long, default_value_t = auraed::server::limits::MAX_HANDSHAKES_PER_PEER)]
    max_handshakes_per_peer: usize,
    /// Most established connections of one client identity (SPIFFE ID), both listeners
    /// together. A count, e.g. 128.
    #[arg(long, default_value_t = auraed::server::limits::MAX_CONNECTIONS_PER_IDENTITY)]
    max_connections_per_identity: usize,
    /// Most concurrent calls (HTTP/2 streams) per connection. A count, e.g. 128.
    #[arg(long, default_value_t = 128)]
    max_streams_per_connection: u32,
    /// Spare cell inits kept ready (namespaces made, set up, waiting): a new top-level cell
    /// with its own namespaces takes one instead of starting its init. 0 turns the pool
    /// off; at most 64. A count, e.g. 4 [default: 2 where cgroup2 is mounted with
    /// favordynmods (auraed as PID 1 mounts it so), else 0: there moving a spare into its
    /// cell waits for an RCU grace period, about as long as a fresh init takes].
    #[arg(long)]
    cell_pool: Option<usize>,
    /// cgroup v2 directory for cells, e.g. /sys/fs/cgroup/aurae [default: aurae below
    /// /sys/fs/cgroup or /sys/fs/cgroup/unified, whichever is cgroup2].
    #[arg(long, env = "AURAED_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// A registry (HOST or HOST:PORT) to reach over plain HTTP instead of HTTPS
    /// (repeatable), e.g. 127.0.0.1:5000.
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// Registry credentials (TOML: [[registry]] host, username, password; mode 0600),
    /// e.g. /etc/aurae/registries.toml.
    #[arg(long, env = "AURAED_REGISTRY_AUTH")]
    registry_auth: Option<PathBuf>,
    /// An extra CA bundle (PEM) for registries, besides the system roots, e.g.
    /// /etc/aurae/registry-ca.pem.
    #[arg(long)]
    registry_ca: Option<PathBuf>,
    /// A host directory under which containers may mount volumes (repeatable), e.g.
    /// /srv/aurae/volumes. None = containers get no volumes.
    #[arg(long = "volume-root")]
    volume_roots: Vec<PathBuf>,
    /// A host directory VM kernels, initramfs images and drives may come from
    /// (repeatable), e.g. /var/lib/aurae/vm-images. None = no virtual machines.
    #[arg(long = "vm-image-root")]
    vm_image_roots: Vec<PathBuf>,
    /// Boot bzImage kernels as given (the guest decompresses itself, with its KASLR)
    /// instead of from the ELF inside them, which auraed otherwise decompresses once and
    /// keeps under the state directory (vm-kernels/) for every later boot of the same
    /// bytes. A switch; in the config file: vm_kernel_as_given = true.
    #[arg(long)]
    vm_kernel_as_given: bool,
    /// The kernel (bzImage or vmlinux) microVM instances boot (Spawn with VM isolation;
    /// probed once at start), e.g. /var/lib/aurae/vmlinux. Without it, instances are
    /// cell-isolated.
    #[arg(long, env = "AURAED_INSTANCE_KERNEL")]
    instance_kernel: Option<PathBuf>,
    /// A directory with the kernel modules the instance kernel needs (`order`, one module
    /// name per line, and `<name>.ko` files: virtio_mmio, virtio_net, bridge, veth, …),
    /// e.g. /var/lib/aurae/instance-modules.
    #[arg(long, env = "AURAED_INSTANCE_MODULES")]
    instance_modules: Option<PathBuf>,
    /// Run as a plain daemon even when started as PID 1 (e.g. in a container). A switch;
    /// in the config file: no_pid1 = true.
    #[arg(long)]
    no_pid1: bool,
    /// Log as JSON lines instead of text. A switch; in the config file: log_json = true.
    #[arg(long)]
    log_json: bool,
}

impl Args {
    /// Every path option that is set, with its flag.
    fn paths_mut(&mut self) -> Vec<(&'static str, &mut PathBuf)> {
        let mut out: Vec<(&'static str, &mut PathBuf)> = vec![
            ("--pki-dir", &mut self.pki_dir),
            ("--socket", &mut self.socket),
            ("--state-dir", &mut self.state_dir),
            ("--cni-conf-dir", &mut self.cni_conf_dir),
            ("--cri-log-root", &mut self.cri_log_root),
        ];
        for (flag, p) in [
            ("--config", &mut self.config),
            ("--policy", &mut self.policy),
            ("--cgroup-root", &mut self.cgroup_root),
            ("--registry-auth", &mut self.registry_auth),
            ("--registry-ca", &mut self.registry_ca),
            ("--instance-kernel", &mut self.instance_kernel),
            ("--instance-modules", &mut self.instance_modules),
            ("--cri-socket", &mut self.cri_socket),
        ] {
            out.extend(p.as_mut().map(|p| (flag, p)));
        }
        out.extend(self.volume_roots.iter_mut().map(|p| ("--volume-root", p)));
        out.extend(self.cni_bin_dirs.iter_mut().map(|p| ("--cni-bin-dir", p)));
        out.extend(
            self.vm_image_roots
                .iter_mut()
                .map(|p| ("--vm-image-root", p)),
        );
        out
    }

    /// The file's settings for every option the user did not give as a flag or through
    /// its environment variable.
    fn apply(&mut self, m: &ArgMatches, file: FileConfig) {
        let open = |id: &str| {
            !matches!(
                m.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        };
        let FileConfig {
            pki_dir,
            socket,
            listen,
            metrics_listen,
            cri_socket,
            cri_identity,
            cni_conf_dir,
            cni_bin_dir,
            cri_log_root,
            cri_stream_address,
            state_dir,
            policy,
            handshake_timeout_s,
            max_connections,
            max_handshakes_per_peer,
            max_connections_per_identity,
            max_streams_per_connection,
            cell_pool,
            cgroup_root,
            insecure_registry,
            registry_auth,
            registry_ca,
            volume_root,
            vm_image_root,
            vm_kernel_as_given,
            instance_kernel,
            instance_modules,
            no_pid1,
            log_json,
        } = file;
        macro_rules! take {
            ($field:ident, $value:expr) => {
                if let Some(v) = $value
                    && open(stringify!($field))
                {
                    self.$field = v;
                }
            };
        }
        take!(pki_dir, pki_dir);
        take!(socket, socket);
        take!(listen, listen.map(Some));
        take!(metrics_listen, metrics_listen.map(Some));
        take!(cri_socket, cri_socket.map(Some));
        take!(cri_identity, cri_identity.map(Some));
        take!(cni_conf_dir, cni_conf_dir);
        take!(cri_log_root, cri_log_root);
        take!(cri_stream_address, cri_stream_address);
        take!(cni_bin_dirs, cni_bin_dir);
        take!(state_dir, state_dir);
        take!(policy, policy.map(Some));
        take!(handshake_timeout_s, handshake_timeout_s);
        take!(max_connections, max_connections);
        take!(max_handshakes_per_peer, max_handshakes_per_peer);
        take!(max_connections_per_identity, max_connections_per_identity);
        take!(max_streams_per_connection, max_streams_per_connection);
        take!(cell_pool, cell_pool.map(Some));
        take!(cgroup_root, cgroup_root.map(Some));
        take!(insecure_registries, insecure_registry);
        take!(registry_auth, registry_auth.map(Some));
        take!(registry_ca, registry_ca.map(Some));
        take!(volume_roots, volume_root);
        take!(vm_image_roots, vm_image_root);
        take!(vm_kernel_as_given, vm_kernel_as_given);
        take!(instance_kernel, instance_kernel.map(Some));
        take!(instance_modules, instance_modules.map(Some));
        take!(no_pid1, no_pid1);
        take!(log_json, log_json);
    }

    /// The settings from parsed flags and environment: the config file merged in, every
    /// path absolute. An error is one line naming the option (or the file and key).
    fn resolve(m: &ArgMatches) -> Result<Self, String> {
        let mut args = Self::from_arg_matches(m).map_err(|e| e.to_string())?;
        if let Some(path) = args.config.clone() {
            let file = FileConfig::load(&path).map_err(|e| e.to_string())?;
            args.apply(m, file);
        }
        for (flag, p) in args.paths_mut() {
            *p = auraed::config::absolute(p)
                .map_err(|reason| format!("{flag} {:?}: the path {reason}", p.display()))?;
        }
        Ok(args)
    }
}

/// Whether a PID 1 auraed was told to stay a plain daemon by its config file
/// (`--config FILE`, `--config=FILE` or AURAED_CONFIG, with `no_pid1 = true`). A config
/// file that is named but does not load also keeps it a daemon: the daemon path reports
/// the file's error and exits, instead of PID 1 ignoring the file and setting the machine
/// up (a container's `auraed --config bad.toml` must not silently become a machine init).
fn config_says_no_pid1(raw: &[std::ffi::OsString]) -> bool {
    let flag = raw.iter().enumerate().find_map(|(i, a)| {
        if a == "--config" {
            raw.get(i + 1).map(PathBuf::from)
        } else {
            a.to_str()?.strip_prefix("--config=").map(PathBuf::from)
        }
    });
    flag.or_else(|| std::env::var_os("AURAED_CONFIG").map(PathBuf::from))
        .is_some_and(|p| FileConfig::load(&p).map_or(true, |f| f.no_pid1 == Some(true)))
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
    // So is the zygote that forks the cell inits.
    if raw
        .get(1)
        .is_some_and(|a| a == auraed::cell::zygote::ZYGOTE_ARG)
    {
        return auraed::cell::zygote::zygote_main();
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
    if std::process::id() == 1
        && !raw.iter().any(|a| a == "--no-pid1")
        && !config_says_no_pid1(&raw)
    {
        run_pid1();
    }
    let args = match Args::resolve(&Args::command().get_matches_from(raw)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("auraed: {e}");
            return ExitCode::FAILURE;
        }
    };
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
        cell_pool: args.cell_pool,
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
        vm_kernel_as_given: args.vm_kernel_as_given,
        mode: "daemon",
        lineage: None,
        bridge_gateway: None,
        instance_kernel: args.instance_kernel,
        instance_modules: args.instance_modules,
        metrics_listen: args.metrics_listen,
        cri: args.cri_socket.map(|socket| auraed::server::CriConfig {
            socket,
            identity: args.cri_identity,
            log_root: args.cri_log_root,
            stream_address: args.cri_stream_address,
            cni: auraed::cri::cni::CniConfig {
                conf_dir: args.cni_conf_dir,
                bin_dirs: if args.cni_bin_dirs.is_empty() {
                    auraed::cri::cni::CniConfig::default().bin_dirs
                } else {
                    args.cni_bin_dirs
                },
            },
        }),
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
            let e = aurae_client::errors::chain_text(e.as_ref());
            tracing::error!("{e}");
            eprintln!("auraed: {e}");
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
        cell_pool: None,
        cgroup_root: Some(boot.cgroup_root),
        mode: "instance",
        warnings: boot.warnings,
        registry: auraed::image::registry::RegistryConfig {
            timeout: Duration::from_secs(30),
            ..Default::default()
        },
        volume_roots: Vec::new(),
        vm_image_roots: Vec::new(),
        vm_kernel_as_given: false,
        lineage: Some(boot.lineage),
        bridge_gateway: Some(boot.bridge_gateway),
        instance_kernel: None,
        instance_modules: None,
        metrics_listen: None,
        cri: None,
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
            eprintln!(
                "auraed (instance): {}",
                aurae_client::errors::chain_text(e.as_ref())
            );
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
    let boot =
        auraed::pid1::prepare(&|w| auraed::server::ahead::make(Path::new(PID1_CGROUP_ROOT), w));
    if boot.probe {
        eprintln!("{}", auraed::instance::handover::PROBE_MARKER);
        auraed::pid1::power_off(false, "KVM probe");
    }
    tracing::info!(hostname = %boot.hostname, listen = ?boot.listen, warnings = boot.warnings.len(), "pid1: machine ready");
    let mut warnings = boot.warnings;
    warnings.extend(auraed::pid1::templates_in_huge_pages(
        &Path::new(PID1_STATE_DIR).join(auraed::instance::template::DIR),
    ));
    let auth = PathBuf::from("/etc/aurae/registries.toml");
    let credentials = if auth.exists() {
        auraed::image::registry::load_credentials(&auth).unwrap_or_else(|e| {
            warnings.push(format!("registry credentials not loaded: {e}"));
            Default::default()
        })
    } else {
        Default::default()
    };
    let mut cfg = pid1_config(
        boot.listen,
        boot.lineage,
        boot.bridge_gateway,
        warnings,
        credentials,
    );
    let file = Path::new(PID1_CONFIG);
    if file.exists() {
        match FileConfig::load(file) {
            Ok(f) => pid1_settings(&mut cfg, f),
            Err(e) => cfg
                .warnings
                .push(format!("{e}: booted without it (built-in settings)")),
        }
    }
    let runtime = match auraed::server::ahead::take_runtime()
        .map_or_else(auraed::server::ahead::runtime, Ok)
    {
        Ok(rt) => rt,
        Err(e) => auraed::pid1::power_off(false, &format!("cannot start the async runtime: {e}")),
    };
    // On a worker of the runtime, not this thread: an instance template's main thread
    // drew its hash keys (the log filter's maps) before the snapshot, so every copy
    // restored from it would make its maps with the same keys.
    let served = runtime.block_on(async {
        tokio::spawn(run(cfg))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("auraed's task ended: {e}")))
    });
    match served {
        Ok(reboot) => auraed::pid1::power_off(reboot, "shutdown requested"),
        Err(e) => auraed::pid1::power_off(
            false,
            &format!(
                "auraed failed: {}",
                aurae_client::errors::chain_text(e.as_ref())
            ),
        ),
    }
}

/// A PID 1 auraed's settings before its configuration file: everything at the machine's
/// fixed places.
fn pid1_config(
    listen: Option<SocketAddr>,
    lineage: Option<auraed::instance::handover::Lineage>,
    bridge_gateway: Option<std::net::Ipv4Addr>,
    warnings: Vec<String>,
    credentials: std::collections::HashMap<String, (String, String)>,
) -> ServerConfig {
    let policy = PathBuf::from("/etc/aurae/policy.toml");
    ServerConfig {
        pki_dir: PathBuf::from("/etc/aurae/pki"),
        socket: PathBuf::from("/run/aurae/auraed.sock"),
        listen,
        state_dir: PathBuf::from(PID1_STATE_DIR),
        policy: policy.exists().then_some(policy),
        handshake_timeout: Duration::from_secs(10),
        max_connections: 1024,
        max_handshakes_per_peer: auraed::server::limits::MAX_HANDSHAKES_PER_PEER,
        max_connections_per_identity: auraed::server::limits::MAX_CONNECTIONS_PER_IDENTITY,
        max_streams_per_connection: 128,
        cell_pool: None,
        cgroup_root: Some(PathBuf::from(PID1_CGROUP_ROOT)),
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
        vm_kernel_as_given: false,
        lineage,
        bridge_gateway,
        // What a PID 1 machine carries for its own microVM instances.
        instance_kernel: Some(PathBuf::from(auraed::pid1::INSTANCE_KERNEL)).filter(|p| p.exists()),
        instance_modules: Some(PathBuf::from(auraed::pid1::INSTANCE_MODULES))
            .filter(|p| p.exists()),
        metrics_listen: None,
        cri: None,
    }
}

/// The configuration file a PID 1 auraed reads, when the machine carries one.
const PID1_CONFIG: &str = "/etc/aurae/auraed.toml";

/// Where a PID 1 auraed keeps its state.
const PID1_STATE_DIR: &str = "/var/lib/aurae";

/// Where a PID 1 auraed keeps its cells.
const PID1_CGROUP_ROOT: &str = "/sys/fs/cgroup/cells";

/// What a PID 1 auraed takes from its configuration file: what the workloads may use
/// (the CRI and its pod networks, registries, volume and VM image roots, metrics, the
/// cell pool and the connection limits). Where its PKI, socket, state, cgroups, policy,
/// registry credentials and instance files are is fixed by the machine it sets up, and
/// its address comes from the kernel's command line: a file setting one of those is
/// reported (a warning in Daemon/Info) and the fixed value kept.
fn pid1_settings(cfg: &mut ServerConfig, file: FileConfig) {
    let FileConfig {
        pki_dir,
        socket,
        listen,
        metrics_listen,
        cri_socket,
        cri_identity,
        cni_conf_dir,
        cni_bin_dir,
        cri_log_root,
        cri_stream_address,
        state_dir,
        policy,
        handshake_timeout_s,
        max_connections,
        max_handshakes_per_peer,
        max_connections_per_identity,
        max_streams_per_connection,
        cell_pool,
        cgroup_root,
        insecure_registry,
        registry_auth,
        registry_ca,
        volume_root,
        vm_image_root,
        vm_kernel_as_given,
        instance_kernel,
        instance_modules,
        no_pid1,
        log_json,
    } = file;
    for (key, set) in [
        ("pki_dir", pki_dir.is_some()),
        ("socket", socket.is_some()),
        ("listen", listen.is_some()),
        ("state_dir", state_dir.is_some()),
        ("policy", policy.is_some()),
        ("cgroup_root", cgroup_root.is_some()),
        ("registry_auth", registry_auth.is_some()),
        ("instance_kernel", instance_kernel.is_some()),
        ("instance_modules", instance_modules.is_some()),
        ("no_pid1", no_pid1.is_some()),
        ("log_json", log_json.is_some()),
    ] {
        if set {
            cfg.warnings.push(format!(
                "{PID1_CONFIG}: key `{key}` is fixed for auraed as PID 1 (the machine's own \
                 places, its address from the kernel command line): ignored"
            ));
        }
    }
    let cri_keys = cri_identity.is_some()
        || cni_conf_dir.is_some()
        || cni_bin_dir.is_some()
        || cri_log_root.is_some()
        || cri_stream_address.is_some();
    match cri_socket {
        Some(socket) => {
            let cni = auraed::cri::cni::CniConfig::default();
            cfg.cri = Some(auraed::server::CriConfig {
                socket,
                identity: cri_identity,
                cni: auraed::cri::cni::CniConfig {
                    conf_dir: cni_conf_dir.unwrap_or(cni.conf_dir),
                    bin_dirs: cni_bin_dir
                        .filter(|d| !d.is_empty())
                        .unwrap_or(cni.bin_dirs),
                },
                log_root: cri_log_root.unwrap_or_else(|| PathBuf::from("/var/log/pods")),
                stream_address: cri_stream_address
                    .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            });
        }
        None if cri_keys => cfg.warnings.push(format!(
            "{PID1_CONFIG}: CRI settings without `cri_socket`: no CRI is served"
        )),
        None => {}
    }
    if metrics_listen.is_some() {
        cfg.metrics_listen = metrics_listen;
    }
    if let Some(s) = handshake_timeout_s {
        cfg.handshake_timeout = Duration::from_secs(s.max(1));
    }
    if let Some(n) = max_connections {
        cfg.max_connections = n.max(1);
    }
    if let Some(n) = max_handshakes_per_peer {
        cfg.max_handshakes_per_peer = n.max(1);
    }
    if let Some(n) = max_connections_per_identity {
        cfg.max_connections_per_identity = n.max(1);
    }
    if let Some(n) = max_streams_per_connection {
        cfg.max_streams_per_connection = n.max(1);
    }
    if cell_pool.is_some() {
        cfg.cell_pool = cell_pool;
    }
    if let Some(r) = insecure_registry {
        cfg.registry.insecure = r;
    }
    if registry_ca.is_some() {
        cfg.registry.extra_ca = registry_ca;
    }
    if let Some(v) = volume_root {
        cfg.volume_roots = v;
    }
    if let Some(v) = vm_image_root {
        cfg.vm_image_roots = v;
    }
    if let Some(v) = vm_kernel_as_given {
        cfg.vm_kernel_as_given = v;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::{any::TypeId, net::SocketAddr, path::Path};

    use clap::ArgAction;

    use super::*;

    /// Flags that are not settings: they have no key in the file.
    const NOT_IN_FILE: &[&str] = &["config", "help", "version"];

    /// A PID 1 machine's file: the CRI and what workloads use are taken; the machine's
    /// own places are kept and each key that tried to move one is reported.
    #[test]
    fn pid1_takes_the_cri_and_workload_settings_from_its_file_and_keeps_its_places() {
        let base = || pid1_config(None, None, None, Vec::new(), Default::default());
        let file = FileConfig::parse(
            "cri_socket = \"/run/aurae/cri.sock\"\ncri_stream_address = \"127.0.0.1:10010\"\n\
             insecure_registry = [\"10.0.0.1:5000\"]\ncell_pool = 3\n\
             state_dir = \"/elsewhere\"\nlisten = \"0.0.0.0:1\"\n",
            Path::new("/etc/aurae/auraed.toml"),
            Path::new("/etc/aurae"),
        )
        .unwrap();
        let mut cfg = base();
        pid1_settings(&mut cfg, file);
        let cri = cfg.cri.as_ref().expect("the CRI is served");
        assert_eq!(cri.socket, Path::new("/run/aurae/cri.sock"));
        assert_eq!(cri.stream_address, "127.0.0.1:10010".parse().unwrap());
        assert_eq!(
            cri.log_root,
            Path::new("/var/log/pods"),
            "the daemon's default"
        );
        assert_eq!(cri.cni.conf_dir, Path::new("/etc/cni/net.d"));
        assert_eq!(cfg.registry.insecure, vec!["10.0.0.1:5000".to_owned()]);
        assert_eq!(cfg.cell_pool, Some(3));
        assert_eq!(cfg.state_dir, Path::new("/var/lib/aurae"), "fixed");
        assert_eq!(cfg.listen, None, "from the kernel command line only");
        assert_eq!(cfg.warnings.len(), 2, "{:?}", cfg.warnings);
        assert!(cfg.warnings[0].contains("`listen`"), "{:?}", cfg.warnings);
        assert!(
            cfg.warnings[1].contains("`state_dir`"),
            "{:?}",
            cfg.warnings
        );

        // CRI settings without a socket: no CRI, and said so.
        let file = FileConfig::parse(
            "cri_log_root = \"/logs\"\n",
            Path::new("/etc/aurae/auraed.toml"),
            Path::new("/etc/aurae"),
        )
        .unwrap();
        let mut cfg = base();
        pid1_settings(&mut cfg, file);
        assert!(cfg.cri.is_none());
        assert!(
            cfg.warnings[0].contains("without `cri_socket`"),
            "{:?}",
            cfg.warnings
        );
        // An empty file changes nothing.
        let mut cfg = base();
        pid1_settings(&mut cfg, FileConfig::default());
        assert!(cfg.cri.is_none() && cfg.warnings.is_empty());
        assert_eq!(cfg.vm_image_roots, base().vm_image_roots);
    }

    fn settings(argv: &[&str]) -> Result<Args, String> {
        let m = Args::command()
            .try_get_matches_from(std::iter::once("auraed").chain(argv.iter().copied()))
            .map_err(|e| e.to_string())?;
        Args::resolve(&m)
    }

    /// The file key of each setting flag, with the arg itself.
    fn setting_args() -> Vec<(String, clap::Arg)> {
        Args::command()
            .get_arguments()
            .filter(|a| !NOT_IN_FILE.contains(&a.get_id().as_str()))
            .map(|a| {
                let long = a
                    .get_long()
                    .unwrap_or_else(|| panic!("{} has no long flag", a.get_id()));
                (long.replace('-', "_"), a.clone())
            })
            .collect()
    }

    /// A TOML value of the arg's type, other than its default; paths relative.
    fn sample(arg: &clap::Arg) -> String {
        let t = arg.get_value_parser().type_id();
        let one = if matches!(arg.get_action(), ArgAction::SetTrue) {
            "true".to_owned()
        } else if t == TypeId::of::<PathBuf>() {
            "\"rel/x\"".to_owned()
        } else if t == TypeId::of::<SocketAddr>() {
            "\"127.0.0.1:1\"".to_owned()
        } else if t == TypeId::of::<String>() {
            "\"example:5000\"".to_owned()
        } else if [
            TypeId::of::<u64>(),
            TypeId::of::<usize>(),
            TypeId::of::<u32>(),
        ]
        .iter()
        .any(|id| t == *id)
        {
            "7".to_owned()
        } else {
            panic!(
                "--{}: teach this test a sample value of its type ({t:?})",
                arg.get_id()
            )
        };
        if matches!(arg.get_action(), ArgAction::Append) {
            format!("[{one}]")
        } else {
            one
        }
    }

    /// The drift test: every flag has a key the file takes, and setting it there changes
    /// what auraed runs with; the file takes no key that is not a flag.
    #[test]
    fn every_flag_can_be_set_in_the_file_and_no_other_key() {
        let dir = tempfile::tempdir().unwrap();
        let defaults = format!("{:?}", settings(&[]).unwrap());
        let mut keys: Vec<String> = Vec::new();
        for (key, arg) in setting_args() {
            assert!(
                auraed::config::KEYS.contains(&key.as_str()),
                "--{} has no key `{key}` in auraed::config (FileConfig and KEYS)",
                arg.get_id()
            );
            let file = dir.path().join(format!("{key}.toml"));
            std::fs::write(&file, format!("{key} = {}\n", sample(&arg))).unwrap();
            let got = settings(&["--config", file.to_str().unwrap()])
                .unwrap_or_else(|e| panic!("{key}: {e}"));
            let mut got_dbg = format!("{got:?}");
            // The config path itself differs: compare the rest.
            got_dbg = got_dbg.replace(&format!("Some({:?})", file), "None");
            assert_ne!(
                got_dbg, defaults,
                "`{key}` in the file changed nothing: Args::apply must take it"
            );
            if arg.get_value_parser().type_id() == TypeId::of::<PathBuf>() {
                let want = dir.path().join("rel/x");
                assert!(
                    got_dbg.contains(&format!("{want:?}")),
                    "`{key}` = \"rel/x\" is not taken from the file's directory: {got_dbg}"
                );
            }
            keys.push(key);
        }
        for k in auraed::config::KEYS {
            assert!(
                keys.iter().any(|x| x == k),
                "the file takes `{k}` but auraed has no flag --{}",
                k.replace('_', "-")
            );
        }
    }

    #[test]
    fn every_option_has_help_with_a_unit_or_example() {
        for a in Args::command().get_arguments() {
            if ["help", "version"].contains(&a.get_id().as_str()) {
                continue;
            }
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(!help.trim().is_empty(), "--{} has no help", a.get_id());
            let takes_value = !matches!(a.get_action(), ArgAction::SetTrue);
            assert!(
                !takes_value || help.contains("e.g.") || help.contains("A count"),
                "--{}: say the unit or give an example: {help}",
                a.get_id()
            );
        }
    }

    #[test]
    fn a_flag_wins_over_the_file_and_the_file_over_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auraed.toml");
        std::fs::write(
            &file,
            "state_dir = \"/from/file\"\nmax_connections = 9\ninsecure_registry = [\"f:1\"]\nlog_json = true\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let a = settings(&["--config", f]).unwrap();
        assert_eq!(a.state_dir, Path::new("/from/file"));
        assert_eq!(a.max_connections, 9);
        assert_eq!(a.insecure_registries, ["f:1"]);
        assert!(a.log_json);
        assert_eq!(a.pki_dir, Path::new("/etc/aurae/pki"), "default kept");
        let a = settings(&[
            "--config",
            f,
            "--state-dir",
            "/from/flag",
            "--max-connections",
            "3",
            "--insecure-registry",
            "c:1",
        ])
        .unwrap();
        assert_eq!(a.state_dir, Path::new("/from/flag"));
        assert_eq!(a.max_connections, 3);
        assert_eq!(a.insecure_registries, ["c:1"]);
        // A flag given with its default value still wins.
        let a = settings(&["--config", f, "--max-connections", "1024"]).unwrap();
        assert_eq!(a.max_connections, 1024);
    }

    #[test]
    fn relative_flags_start_at_the_working_directory() {
        let cwd = std::env::current_dir().unwrap();
        let a = settings(&[
            "--state-dir",
            "state",
            "--pki-dir",
            "pki",
            "--socket",
            "run/a.sock",
            "--volume-root",
            "vols",
        ])
        .unwrap();
        assert_eq!(a.state_dir, cwd.join("state"));
        assert_eq!(a.pki_dir, cwd.join("pki"));
        assert_eq!(a.socket, cwd.join("run/a.sock"));
        assert_eq!(a.volume_roots, [cwd.join("vols")]);
    }

    #[test]
    fn every_path_option_is_made_absolute() {
        // Each PathBuf flag given relative comes back absolute: paths_mut misses none.
        let mut argv: Vec<String> = Vec::new();
        for a in Args::command().get_arguments() {
            if a.get_value_parser().type_id() == TypeId::of::<PathBuf>() && a.get_id() != "config" {
                argv.push(format!("--{}", a.get_long().unwrap()));
                argv.push("rel/p".into());
            }
        }
        assert!(argv.len() >= 2 * 11, "{argv:?}");
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let got = format!("{:?}", settings(&refs).unwrap());
        assert!(
            !got.contains("\"rel/p\""),
            "a relative path was kept: {got}"
        );
    }

    #[test]
    fn a_path_that_cannot_be_made_absolute_is_refused_naming_the_flag() {
        // clap itself refuses an empty path flag (an unreadable working directory is
        // tested on the binary, in tests/host_service_config.rs).
        let e = settings(&["--state-dir", ""]).unwrap_err();
        assert!(e.contains("--state-dir"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auraed.toml");
        std::fs::write(&file, "pki_dir = \"\"\n").unwrap();
        let e = settings(&["--config", file.to_str().unwrap()]).unwrap_err();
        assert!(
            e.contains("key `pki_dir`") && e.contains(file.to_str().unwrap()),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_key_stops_auraed_naming_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auraed.toml");
        std::fs::write(&file, "statedir = \"/x\"\n").unwrap();
        let e = settings(&["--config", file.to_str().unwrap()]).unwrap_err();
        assert!(
            e.contains("`statedir`") && e.contains(file.to_str().unwrap()),
            "{e}"
        );
        let e = settings(&[
            "--config",
            dir.path().join("missing.toml").to_str().unwrap(),
        ])
        .unwrap_err();
        assert!(e.contains("missing.toml"), "{e}");
    }

    fn dist(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../dist")
            .join(name)
    }

    /// `# key = value` lines of the example, uncommented.
    fn uncommented(text: &str) -> String {
        text.lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest
                        .split_once(" = ")
                        .is_some_and(|(k, _)| auraed::config::KEYS.contains(&k.trim())) =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// dist/auraed.toml: parses with the real parser as shipped, its uncommented values
    /// are the real defaults, and with its optional keys uncommented it names every key
    /// and still parses.
    #[test]
    fn the_example_config_is_complete_and_true() {
        let example = dist("auraed.toml");
        let f = example.to_str().unwrap();
        let shipped = settings(&["--config", f]).unwrap_or_else(|e| panic!("{e}"));
        let defaults = settings(&[]).unwrap();
        assert_eq!(
            format!("{shipped:?}").replace(&format!("Some({example:?})"), "None"),
            format!("{defaults:?}"),
            "the example's uncommented values must be auraed's defaults"
        );
        let text = std::fs::read_to_string(&example).unwrap();
        let full = uncommented(&text);
        let table: toml::Table = toml::from_str(&full).unwrap();
        for k in auraed::config::KEYS {
            assert!(
                table.contains_key(*k),
                "dist/auraed.toml does not show `{k}`"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let all = dir.path().join("auraed.toml");
        std::fs::write(&all, &full).unwrap();
        let a = settings(&["--config", all.to_str().unwrap()]).unwrap_or_else(|e| panic!("{e}"));
        assert!(a.listen.is_some() && a.metrics_listen.is_some() && a.policy.is_some());
        assert_eq!(a.insecure_registries, ["127.0.0.1:5000"]);
    }

    /// dist/auraed.service starts this binary with the example config, claims no
    /// readiness protocol auraed does not speak, and leaves auraed's workloads to it.
    #[test]
    fn the_unit_and_tmpfiles_fit_auraed() {
        let unit = std::fs::read_to_string(dist("auraed.service")).unwrap();
        let lines: Vec<&str> = unit.lines().map(str::trim).collect();
        for want in [
            "ExecStart=/usr/local/bin/auraed --config /etc/aurae/auraed.toml",
            "Type=simple",
            "Restart=on-failure",
            "Delegate=yes",
            "KillMode=process",
        ] {
            assert!(lines.contains(&want), "dist/auraed.service lacks {want}");
        }
        assert!(
            !unit.contains("Type=notify"),
            "auraed does not implement sd_notify"
        );
        let tmpfiles = std::fs::read_to_string(dist("aurae.conf")).unwrap();
        let modes: Vec<(String, String)> = tmpfiles
            .lines()
            .filter(|l| l.starts_with("d "))
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                (w[1].to_owned(), w[2].to_owned())
            })
            .collect();
        let defaults = settings(&[]).unwrap();
        let socket_dir = defaults
            .socket
            .parent()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let state_dir = defaults.state_dir.to_str().unwrap().to_owned();
        for (path, mode) in [
            (socket_dir.as_str(), "0700"),
            (state_dir.as_str(), "0700"),
            ("/etc/aurae", "0755"),
        ] {
            assert!(
                modes.contains(&(path.to_owned(), mode.to_owned())),
                "dist/aurae.conf: {path} {mode} missing: {modes:?}"
            );
        }
    }

    #[test]
    fn no_pid1_in_the_config_file_is_seen_before_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auraed.toml");
        std::fs::write(&file, "no_pid1 = true\n").unwrap();
        let f = file.to_str().unwrap();
        assert!(config_says_no_pid1(&[
            "auraed".into(),
            "--config".into(),
            f.into()
        ]));
        assert!(config_says_no_pid1(&[
            "auraed".into(),
            format!("--config={f}").into()
        ]));
        // A file that does not load is reported by the daemon path, not ignored by PID 1.
        std::fs::write(&file, "no_pid1 = true\nbogus = 1\n").unwrap();
        assert!(config_says_no_pid1(&[
            "auraed".into(),
            "--config".into(),
            f.into()
        ]));
        assert!(config_says_no_pid1(&[
            "auraed".into(),
            "--config".into(),
            dir.path().join("missing.toml").into_os_string()
        ]));
        std::fs::write(&file, "no_pid1 = false\n").unwrap();
        assert!(!config_says_no_pid1(&[
            "auraed".into(),
            "--config".into(),
            f.into()
        ]));
    }
}
