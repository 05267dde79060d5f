//! A typed async mTLS client for auraed, over its Unix socket or TCP.
//!
//! Used by `aer`, by tests, and later by auraed itself to drive spawned instances.
//! TLS is always on: the connector does the rustls handshake itself (TLS 1.3, ring), so the
//! same code path serves both transports and tests can present any certificate they like.
#![forbid(unsafe_code)]

pub mod config;
pub mod errors;
pub mod session;
pub mod spdy;

use std::sync::Arc;

use aurae_proto::runtime::v0::{
    cells_client::CellsClient, daemon_client::DaemonClient, events_client::EventsClient,
    executables_client::ExecutablesClient, images_client::ImagesClient,
    instances_client::InstancesClient, pods_client::PodsClient, runtime_client::RuntimeClient,
    virtual_machines_client::VirtualMachinesClient,
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint as TonicEndpoint};
use tonic_health::pb::health_client::HealthClient;

pub use config::{ClientConfig, ConfigError, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("TLS setup: {0}")]
    Tls(#[from] aurae_identity::TlsError),
    #[error("{0} is not a valid TLS server name")]
    ServerName(String),
    #[error("cannot reach auraed at {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// The host part of `host:port` / `[v6]:port`, as a TLS server name.
pub fn server_name_of(endpoint: &str) -> String {
    let host = endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned()
}

/// A connected client. Cloning is cheap and shares the connection.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
}

impl Client {
    /// Connects and completes the mTLS handshake.
    pub async fn connect(cfg: &ClientConfig) -> Result<Self, ClientError> {
        cfg.check_files()?;
        let tls = aurae_identity::tls::client_config(&cfg.ca, &cfg.cert, &cfg.key)?;
        Self::connect_with(&cfg.endpoint, &cfg.server_name, tls).await
    }

    /// Connects with an explicit rustls configuration (tests use odd certificates).
    pub async fn connect_with(
        endpoint: &Endpoint,
        server_name: &str,
        tls: rustls::ClientConfig,
    ) -> Result<Self, ClientError> {
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| ClientError::ServerName(server_name.to_owned()))?;
        let connector = TlsConnector::from(Arc::new(tls));
        let target = endpoint.clone();
        let service = tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            let name = name.clone();
            let target = target.clone();
            async move {
                match target {
                    Endpoint::Unix(path) => {
                        let s = UnixStream::connect(&path).await?;
                        connector
                            .connect(name, s)
                            .await
                            .map(|t| TokioIo::new(Stream::Unix(t)))
                    }
                    Endpoint::Tcp(addr) => {
                        let s = TcpStream::connect(addr.as_str()).await?;
                        s.set_nodelay(true)?;
                        connector
                            .connect(name, s)
                            .await
                            .map(|t| TokioIo::new(Stream::Tcp(t)))
                    }
                }
            }
        });
        let channel = placeholder_endpoint()
            .connect_with_connector(service)
            .await
            .map_err(|source| ClientError::Connect {
                endpoint: endpoint.to_string(),
                source,
            })?;
        Ok(Self { channel })
    }

    /// Connects to a spawned instance at `endpoint` (`host:port`, as its parent's
    /// `InstanceStatus.endpoint` says) with `cfg`'s CA and identity, requiring the server
    /// to present exactly `expected` (the SPIFFE ID the parent minted for it).
    pub async fn connect_instance(
        cfg: &ClientConfig,
        endpoint: &str,
        expected: &aurae_identity::SpiffeId,
    ) -> Result<Self, ClientError> {
        cfg.check_files()?;
        let tls = aurae_identity::tls::client_config_expecting(
            aurae_identity::tls::load_certs(&cfg.ca)?,
            Some((
                aurae_identity::tls::load_certs(&cfg.cert)?,
                aurae_identity::tls::load_key(&cfg.key)?,
            )),
            Some(expected.clone()),
        )?;
        Self::connect_with(
            &Endpoint::Tcp(endpoint.to_owned()),
            &server_name_of(endpoint),
            tls,
        )
        .await
    }

    /// Connects over TCP through `dial`, which makes the connected socket (run on a
    /// blocking thread): e.g. a socket made inside another network namespace.
    pub async fn connect_tcp_with<D>(
        dial: D,
        server_name: &str,
        tls: rustls::ClientConfig,
    ) -> Result<Self, ClientError>
    where
        D: Fn() -> std::io::Result<std::net::TcpStream> + Send + Sync + Clone + 'static,
    {
        Self::dial_tcp(dial, server_name, tls, false).await
    }

    /// [`Client::connect_tcp_with`] with HTTP/2 keepalive pings, also while idle: calls and
    /// streams to a peer that stopped answering (a hung guest, a dead link) fail within
    /// [`KEEPALIVE_INTERVAL`] + [`KEEPALIVE_TIMEOUT`] instead of waiting forever. For a
    /// daemon's own connections to what it runs (its spawned instances).
    pub async fn connect_tcp_with_keepalive<D>(
        dial: D,
        server_name: &str,
        tls: rustls::ClientConfig,
    ) -> Result<Self, ClientError>
    where
        D: Fn() -> std::io::Result<std::net::TcpStream> + Send + Sync + Clone + 'static,
    {
        Self::dial_tcp(dial, server_name, tls, true).await
    }

    async fn dial_tcp<D>(
        dial: D,
        server_name: &str,
        tls: rustls::ClientConfig,
        keepalive: bool,
    ) -> Result<Self, ClientError>
    where
        D: Fn() -> std::io::Result<std::net::TcpStream> + Send + Sync + Clone + 'static,
    {
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| ClientError::ServerName(server_name.to_owned()))?;
        let connector = TlsConnector::from(Arc::new(tls));
        let service = tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            let name = name.clone();
            let dial = dial.clone();
            async move {
                let std_stream = tokio::task::spawn_blocking(dial)
                    .await
                    .map_err(std::io::Error::other)??;
                std_stream.set_nonblocking(true)?;
                let s = TcpStream::from_std(std_stream)?;
                s.set_nodelay(true)?;
                connector
                    .connect(name, s)
                    .await
                    .map(|t| TokioIo::new(Stream::Tcp(t)))
            }
        });
        let endpoint = placeholder_endpoint();
        let endpoint = if keepalive {
            endpoint
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
        } else {
            endpoint
        };
        let channel = endpoint
            .connect_with_connector(service)
            .await
            .map_err(|source| ClientError::Connect {
                endpoint: "custom dialer".into(),
                source,
            })?;
        Ok(Self { channel })
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn runtime(&self) -> RuntimeClient<Channel> {
        RuntimeClient::new(self.channel.clone())
    }
    pub fn executables(&self) -> ExecutablesClient<Channel> {
        ExecutablesClient::new(self.channel.clone())
    }
    pub fn cells(&self) -> CellsClient<Channel> {
        CellsClient::new(self.channel.clone())
    }
    pub fn virtual_machines(&self) -> VirtualMachinesClient<Channel> {
        VirtualMachinesClient::new(self.channel.clone())
    }
    pub fn instances(&self) -> InstancesClient<Channel> {
        InstancesClient::new(self.channel.clone())
    }
    pub fn pods(&self) -> PodsClient<Channel> {
        PodsClient::new(self.channel.clone())
    }
    pub fn events(&self) -> EventsClient<Channel> {
        EventsClient::new(self.channel.clone())
    }
    pub fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone())
    }
    pub fn daemon(&self) -> DaemonClient<Channel> {
        DaemonClient::new(self.channel.clone())
    }
    pub fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel.clone())
    }
}

/// A TLS stream over either transport.
enum Stream {
    Unix(tokio_rustls::client::TlsStream<UnixStream>),
    Tcp(tokio_rustls::client::TlsStream<TcpStream>),
}

mod io_impl {
    use std::{
        io,
        pin::Pin,
        task::{Context, Poll},
    };

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    use super::Stream;

    impl AsyncRead for Stream {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            match self.get_mut() {
                Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
                Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            }
        }
    }

    impl AsyncWrite for Stream {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            match self.get_mut() {
                Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
                Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            }
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            match self.get_mut() {
                Stream::Unix(s) => Pin::new(s).poll_flush(cx),
                Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            }
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            match self.get_mut() {
                Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
                Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            }
        }
    }
}

/// The channel's endpoint: the URI is only a placeholder (the connector decides where to
/// connect).
fn placeholder_endpoint() -> TonicEndpoint {
    TonicEndpoint::from_static("http://auraed.invalid")
}

/// How often a keepalive connection is pinged.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed. Generous: a guest
/// under nested emulation has been seen to leave a ping 10 s unanswered while it was busy
/// and well.
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
