//! A small OCI distribution client: manifests and blobs over HTTP/1.1, HTTPS with the
//! system roots (plus an extra CA), plain HTTP only for registries configured insecure,
//! anonymous, basic and bearer-token auth, redirects, and deadlines against stalls.
//! Every byte it returns is verified against its digest by the caller before use.

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

/// Media types we accept for manifests, most specific first.
pub const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {registry}: {message}")]
    Transport { registry: String, message: String },
    #[error("registry {registry} answered {status} for {what}")]
    Status {
        registry: String,
        status: u16,
        what: String,
    },
    #[error("registry {registry} did not answer within {secs} s ({what})")]
    Timeout {
        registry: String,
        secs: u64,
        what: String,
    },
    #[error(
        "registry {registry} is not allowed over plain HTTP (mark it insecure in the configuration)"
    )]
    Insecure { registry: String },
    #[error("{0}")]
    Other(String),
}

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// Registries (`host` or `host:port`) reached over plain HTTP.
    pub insecure: Vec<String>,
    /// An extra CA bundle (PEM) trusted besides the system roots.
    pub extra_ca: Option<PathBuf>,
    /// user, password per registry.
    pub credentials: HashMap<String, (String, String)>,
    /// Deadline for connecting and for each read.
    pub timeout: Duration,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    #[serde(default)]
    registry: Vec<CredentialEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialEntry {
    host: String,
    username: String,
    password: String,
}

/// Registry credentials from a TOML file (`--registry-auth`):
///
/// ```toml
/// [[registry]]
/// host = "registry.example.com:5000"
/// username = "puller"
/// password = "…"
/// ```
///
/// The file holds secrets: it must not be readable or writable by group or others.
pub fn load_credentials(
    path: &std::path::Path,
) -> Result<HashMap<String, (String, String)>, String> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if md.mode() & 0o077 != 0 {
        return Err(format!(
            "{}: mode {:o} lets others read registry passwords; chmod 600 it",
            path.display(),
            md.mode() & 0o777
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let f: CredentialsFile =
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = HashMap::new();
    for (i, r) in f.registry.into_iter().enumerate() {
        if r.host.is_empty() || r.host.contains('/') || r.host.contains(char::is_whitespace) {
            return Err(format!(
                "{}: registry[{i}].host {:?} is not HOST[:PORT]",
                path.display(),
                r.host
            ));
        }
        if out
            .insert(r.host.clone(), (r.username, r.password))
            .is_some()
        {
            return Err(format!(
                "{}: registry {} is listed twice",
                path.display(),
                r.host
            ));
        }
    }
    Ok(out)
}

/// A response: status, content type, body stream.
pub struct Response {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub headers: http::HeaderMap,
    pub body: hyper::body::Incoming,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Debug, Clone)]
pub struct Registry {
    cfg: RegistryConfig,
    tls: Arc<rustls::ClientConfig>,
    tokens: Arc<std::sync::Mutex<HashMap<String, String>>>,
}

fn system_roots(extra: Option<&PathBuf>) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for p in ["/etc/ssl/certs/ca-certificates.crt"]
        .into_iter()
        .map(PathBuf::from)
        .chain(extra.cloned())
    {
        if let Ok(certs) = aurae_identity::tls::load_certs(&p) {
            for c in certs {
                let _ = roots.add(c);
            }
        }
    }
    roots
}

impl Registry {
    pub fn new(cfg: RegistryConfig) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| {
                b.with_root_certificates(system_roots(cfg.extra_ca.as_ref()))
                    .with_no_client_auth()
            });
        let tls = match tls {
            Ok(t) => t,
            Err(_) => rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        };
        Self {
            cfg,
            tls: Arc::new(tls),
            tokens: Arc::default(),
        }
    }

    fn base(&self, registry: &str) -> String {
        if self.cfg.insecure.iter().any(|r| r == registry) {
            format!("http://{registry}")
        } else {
            format!("https://{registry}")
        }
    }

    fn secs(&self) -> u64 {
        self.cfg.timeout.as_secs().max(1)
    }

    /// One request on a fresh connection (registries are few requests per pull).
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(header::HeaderName, String)],
        body: Bytes,
    ) -> Result<Response, RegistryError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| RegistryError::Other(format!("bad URL {url}: {e}")))?;
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri.authority().map(ToString::to_string).unwrap_or_default();
        let terr = |m: String| RegistryError::Transport {
            registry: authority.clone(),
            message: m,
        };
        let timeout = self.cfg.timeout.max(Duration::from_secs(1));
        let tcp = tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|_| RegistryError::Timeout {
                registry: authority.clone(),
                secs: self.secs(),
                what: "connect".into(),
            })?
            .map_err(|e| terr(format!("connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = if https {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| terr(format!("server name: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone());
            Box::new(
                tokio::time::timeout(timeout, tls.connect(name, tcp))
                    .await
                    .map_err(|_| RegistryError::Timeout {
                        registry: authority.clone(),
                        secs: self.secs(),
                        what: "TLS handshake".into(),
                    })?
                    .map_err(|e| terr(format!("TLS: {e}")))?,
            )
        } else {
            Box::new(tcp)
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| terr(format!("HTTP: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let path = uri
            .path_and_query()
            .map_or("/".to_owned(), ToString::to_string);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, authority.clone())
            .header(header::USER_AGENT, "auraed");
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| RegistryError::Other(e.to_string()))?;
        let resp = tokio::time::timeout(timeout, sender.send_request(req))
            .await
            .map_err(|_| RegistryError::Timeout {
                registry: authority.clone(),
                secs: self.secs(),
                what: url.to_owned(),
            })?
            .map_err(|e| terr(format!("request: {e}")))?;
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_owned());
        let (parts, body) = resp.into_parts();
        Ok(Response {
            status: parts.status,
            content_type,
            headers: parts.headers,
            body,
        })
    }

    /// GET with auth (bearer token dance or basic) and up to 5 redirects.
    pub async fn get(
        &self,
        registry: &str,
        repository: &str,
        path: &str,
        accept: Option<&str>,
    ) -> Result<Response, RegistryError> {
        let mut url = format!("{}/v2/{repository}/{path}", self.base(registry));
        let key = format!("{registry}/{repository}");
        for _ in 0..6 {
            let mut headers = Vec::new();
            if let Some(a) = accept {
                headers.push((header::ACCEPT, a.to_owned()));
            }
            let same_host = url.starts_with(&self.base(registry));
            if same_host {
                if let Some(t) = self.tokens.lock().ok().and_then(|t| t.get(&key).cloned()) {
                    headers.push((header::AUTHORIZATION, format!("Bearer {t}")));
                } else if let Some((u, p)) = self.cfg.credentials.get(registry) {
                    let b = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
                    headers.push((header::AUTHORIZATION, format!("Basic {b}")));
                }
            }
            let resp = self.send(Method::GET, &url, &headers, Bytes::new()).await?;
            match resp.status {
                s if s.is_redirection() => {
                    let loc = resp
                        .headers
                        .get(header::LOCATION)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    if loc.is_empty() {
                        return Err(RegistryError::Other(format!(
                            "redirect without a location from {url}"
                        )));
                    }
                    url = if loc.starts_with("http") {
                        loc
                    } else {
                        format!("{}{loc}", self.base(registry))
                    };
                }
                StatusCode::UNAUTHORIZED if same_host => {
                    let challenge = resp
                        .headers
                        .get(header::WWW_AUTHENTICATE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    if self.tokens.lock().is_ok_and(|t| t.contains_key(&key))
                        || !challenge.starts_with("Bearer")
                    {
                        return Err(RegistryError::Status {
                            registry: registry.into(),
                            status: 401,
                            what: format!("{repository}/{path} (credentials refused)"),
                        });
                    }
                    let token = self.token(registry, &challenge).await?;
                    if let Ok(mut t) = self.tokens.lock() {
                        t.insert(key.clone(), token);
                    }
                }
                _ => return Ok(resp),
            }
        }
        Err(RegistryError::Other(format!(
            "too many redirects for {repository}/{path}"
        )))
    }

    /// Fetches a bearer token as a `WWW-Authenticate: Bearer realm=…,service=…,scope=…`
    /// challenge says.
    async fn token(&self, registry: &str, challenge: &str) -> Result<String, RegistryError> {
        let mut params = HashMap::new();
        for part in challenge.trim_start_matches("Bearer").split(',') {
            if let Some((k, v)) = part.trim().split_once('=') {
                params.insert(k.to_owned(), v.trim_matches('"').to_owned());
            }
        }
        let realm = params
            .get("realm")
            .ok_or_else(|| RegistryError::Other("bearer challenge without a realm".into()))?;
        let mut url = realm.clone();
        let q: Vec<String> = ["service", "scope"]
            .iter()
            .filter_map(|k| params.get(*k).map(|v| format!("{k}={v}")))
            .collect();
        if !q.is_empty() {
            url = format!("{url}?{}", q.join("&"));
        }
        let mut headers = Vec::new();
        if let Some((u, p)) = self.cfg.credentials.get(registry) {
            let b = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            headers.push((header::AUTHORIZATION, format!("Basic {b}")));
        }
        let resp = self.send(Method::GET, &url, &headers, Bytes::new()).await?;
        if !resp.status.is_success() {
            return Err(RegistryError::Status {
                registry: registry.into(),
                status: resp.status.as_u16(),
                what: "token".into(),
            });
        }
        let body = read_small(resp.body, 64 << 10, self.cfg.timeout, registry).await?;
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| RegistryError::Other(format!("token answer: {e}")))?;
        v.get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .map(str::to_owned)
            .ok_or_else(|| RegistryError::Other("token answer has no token".into()))
    }
}

/// Reads a whole (small) body, at most `max` bytes, each frame within `timeout`.
pub async fn read_small(
    mut body: hyper::body::Incoming,
    max: usize,
    timeout: Duration,
    registry: &str,
) -> Result<Vec<u8>, RegistryError> {
    let mut out = Vec::new();
    loop {
        let frame = tokio::time::timeout(timeout.max(Duration::from_secs(1)), body.frame())
            .await
            .map_err(|_| RegistryError::Timeout {
                registry: registry.into(),
                secs: timeout.as_secs().max(1),
                what: "reading a body".into(),
            })?;
        match frame {
            None => return Ok(out),
            Some(Err(e)) => {
                return Err(RegistryError::Transport {
                    registry: registry.into(),
                    message: e.to_string(),
                });
            }
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    if out.len() + d.len() > max {
                        return Err(RegistryError::Other(format!(
                            "answer larger than {max} bytes"
                        )));
                    }
                    out.extend_from_slice(&d);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn credentials_file_is_private_and_well_formed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("auth.toml");
        std::fs::write(
            &p,
            "[[registry]]\nhost = \"r.example:5000\"\nusername = \"u\"\npassword = \"p\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_credentials(&p).unwrap_err().contains("chmod 600"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = load_credentials(&p).unwrap();
        assert_eq!(c["r.example:5000"], ("u".to_owned(), "p".to_owned()));
        std::fs::write(
            &p,
            "[[registry]]\nhost = \"a/b\"\nusername = \"u\"\npassword = \"p\"\n",
        )
        .unwrap();
        assert!(load_credentials(&p).unwrap_err().contains("HOST[:PORT]"));
        std::fs::write(&p, "[[registry]]\nhost = \"a\"\nuser = \"u\"\n").unwrap();
        assert!(load_credentials(&p).is_err(), "unknown keys are refused");
    }
}
