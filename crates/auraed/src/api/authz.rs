//! Authorization: one tower layer in front of every service.
//!
//! The TLS handshake already proved the peer's SPIFFE ID (see `server`). This layer maps
//! the ID and the gRPC method to a policy grant, answers `PERMISSION_DENIED` when there is
//! none, writes an audit line for every decision, and opens the per-RPC tracing span. The
//! handlers then check the resource name against the grant with [`Caller::authorize_name`].

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use aurae_identity::SpiffeId;
use tonic::Status;
use tower::{Layer, Service};
use tracing::{Instrument, info, info_span};
use uuid::Uuid;

use crate::identity::{Grant, Policy};

/// How a connection reached auraed.
#[derive(Debug, Clone)]
pub enum Transport {
    /// The Unix socket, with the peer's credentials from `SO_PEERCRED`.
    Unix {
        uid: u32,
        pid: Option<i32>,
    },
    Tcp(std::net::SocketAddr),
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix { uid, pid } => match pid {
                Some(p) => write!(f, "unix uid={uid} pid={p}"),
                None => write!(f, "unix uid={uid}"),
            },
            Self::Tcp(a) => write!(f, "tcp {a}"),
        }
    }
}

/// The verified peer of a connection: set once at the handshake, given to every request.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub id: SpiffeId,
    pub transport: Transport,
}

/// The authorized caller of one RPC, inserted into the request's extensions.
#[derive(Debug, Clone)]
pub struct Caller {
    pub id: SpiffeId,
    pub grant: Grant,
    pub method: Arc<str>,
    pub request_id: Uuid,
}

impl Caller {
    /// The caller of a request that passed the authorization layer.
    pub fn of<T>(req: &tonic::Request<T>) -> Result<Caller, Status> {
        req.extensions().get::<Caller>().cloned().ok_or_else(|| {
            Status::internal("request reached a handler without passing authorization")
        })
    }

    /// Checks that the grant covers the resource `name`; audit-logs the decision.
    pub fn authorize_name(&self, name: &str) -> Result<(), Status> {
        if self.grant.allows_name(name) {
            info!(target: "aurae::audit", peer_id = %self.id, method = %self.method, resource = name, decision = "allow");
            Ok(())
        } else {
            info!(target: "aurae::audit", peer_id = %self.id, method = %self.method, resource = name, decision = "deny");
            Err(Status::permission_denied(format!(
                "{} may not touch {name:?}: outside the names its policy grant allows",
                self.id
            )))
        }
    }

    /// Checks a privileged option (uid 0, sharing a host namespace) against the grant.
    pub fn authorize_privilege(&self, allowed: bool, what: &str, name: &str) -> Result<(), Status> {
        if allowed {
            return Ok(());
        }
        info!(target: "aurae::audit", peer_id = %self.id, method = %self.method, resource = name, privilege = what, decision = "deny");
        Err(Status::permission_denied(format!(
            "{} may not {what}: its policy grant does not allow it",
            self.id
        )))
    }
}

/// The layer; see the module documentation.
#[derive(Debug, Clone)]
pub struct AuthzLayer {
    policy: Arc<Policy>,
}

impl AuthzLayer {
    pub fn new(policy: Arc<Policy>) -> Self {
        Self { policy }
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authz {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Authz<S> {
    inner: S,
    policy: Arc<Policy>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<B>> for Authz<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let method: Arc<str> = Arc::from(req.uri().path().trim_start_matches('/'));
        let request_id = Uuid::new_v4();
        let Some(peer) = req.extensions().get::<PeerInfo>().cloned() else {
            let status = Status::unauthenticated("connection carries no verified identity");
            return Box::pin(async move { Ok(status.into_http()) });
        };
        let span = info_span!("rpc", rpc = %method, peer_id = %peer.id, via = %peer.transport, request_id = %request_id);
        let Some(grant) = self.policy.authorize(&peer.id, &method) else {
            info!(target: "aurae::audit", parent: &span, peer_id = %peer.id, method = %method, resource = "-", decision = "deny");
            let status = Status::permission_denied(format!("{} may not call {method}", peer.id));
            return Box::pin(async move { Ok(status.into_http()) });
        };
        info!(target: "aurae::audit", parent: &span, peer_id = %peer.id, method = %method, resource = "-", decision = "allow");
        req.extensions_mut().insert(Caller {
            id: peer.id,
            grant,
            method,
            request_id,
        });
        // The service that was polled ready is the one that must be called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(inner.call(req).instrument(span))
    }
}
