//! Client configuration: flags, then `$AURAE_CONFIG` or `~/.config/aurae/config.toml`.
//!
//! ```toml
//! # ~/.config/aurae/config.toml
//! socket = "/run/aurae/auraed.sock"   # or: endpoint = "127.0.0.1:8443"
//! pki_dir = "/etc/aurae/pki"          # ca.pem, admin.pem, admin.key
//! # Optional, each overriding the file in pki_dir:
//! # ca = "/path/ca.pem"
//! # cert = "/path/alice.pem"
//! # key = "/path/alice.key"
//! # server_name = "localhost"         # name checked against auraed's certificate
//! ```

use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use serde::Deserialize;

pub const DEFAULT_SOCKET: &str = "/run/aurae/auraed.sock";
pub const DEFAULT_PKI_DIR: &str = "/etc/aurae/pki";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(
        "{what} {path} is missing. Create a development PKI with `aer pki init --dir {dir}` \
         (then start auraed with `--pki-dir {dir}`), or point --pki-dir / the config file at yours"
    )]
    Missing {
        what: &'static str,
        path: PathBuf,
        dir: String,
    },
    #[error(
        "auraed's socket {0} does not exist: is auraed running? (start it with `auraed --socket {0}`, or pass --socket/--endpoint)"
    )]
    NoSocket(PathBuf),
    #[error("set either a socket or an endpoint, not both")]
    BothEndpoints,
}

/// Where auraed is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// A resolved client configuration.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub endpoint: Endpoint,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub server_name: String,
    pki_dir: PathBuf,
}

/// The config file's fields.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub socket: Option<PathBuf>,
    pub endpoint: Option<String>,
    pub pki_dir: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub server_name: Option<String>,
}

/// Values given on the command line; each wins over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub endpoint: Option<String>,
    pub pki_dir: Option<PathBuf>,
    pub identity: Option<String>,
    pub server_name: Option<String>,
}

fn default_config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AURAE_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("aurae/config.toml"))
}

impl FileConfig {
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }
}

impl ClientConfig {
    /// Resolves flags over the config file over defaults. An explicit `--config` (or
    /// `$AURAE_CONFIG`) must exist; the default path may be absent.
    pub fn resolve(o: &Overrides) -> Result<Self, ConfigError> {
        let file = match (&o.config, default_config_path()) {
            (Some(p), _) => FileConfig::read(p)?,
            (None, Some(p)) if std::env::var_os("AURAE_CONFIG").is_some() || p.exists() => {
                FileConfig::read(&p)?
            }
            _ => FileConfig::default(),
        };
        let endpoint = match (&o.socket, &o.endpoint) {
            (Some(_), Some(_)) => return Err(ConfigError::BothEndpoints),
            (Some(s), None) => Endpoint::Unix(s.clone()),
            (None, Some(e)) => Endpoint::Tcp(e.clone()),
            (None, None) => match (&file.socket, &file.endpoint) {
                (Some(_), Some(_)) => return Err(ConfigError::BothEndpoints),
                (Some(s), None) => Endpoint::Unix(s.clone()),
                (None, Some(e)) => Endpoint::Tcp(e.clone()),
                (None, None) => Endpoint::Unix(PathBuf::from(DEFAULT_SOCKET)),
            },
        };
        let pki_dir = o
            .pki_dir
            .clone()
            .or(file.pki_dir.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PKI_DIR));
        let identity = o.identity.clone().unwrap_or_else(|| "admin".to_owned());
        let (id_cert, id_key) = aurae_identity::PkiPaths::new(&pki_dir).identity(&identity);
        // Flags name a PKI directory or identity: they win over individual files too.
        let from_flags = o.pki_dir.is_some() || o.identity.is_some();
        let pick = |flag_default: PathBuf, file_value: &Option<PathBuf>| match file_value {
            Some(p) if !from_flags => p.clone(),
            _ => flag_default,
        };
        let server_name = o
            .server_name
            .clone()
            .or(file.server_name.clone())
            .unwrap_or_else(|| match &endpoint {
                Endpoint::Unix(_) => "localhost".to_owned(),
                Endpoint::Tcp(a) => host_of(a),
            });
        Ok(Self {
            ca: pick(pki_dir.join("ca.pem"), &file.ca),
            cert: pick(id_cert, &file.cert),
            key: pick(id_key, &file.key),
            endpoint,
            server_name,
            pki_dir,
        })
    }

    /// Fails with a message that says which file is missing and how to make it.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let dir = self.pki_dir.display().to_string();
        for (what, path) in [
            ("the CA certificate", &self.ca),
            ("the client certificate", &self.cert),
            ("the client key", &self.key),
        ] {
            if !path.exists() {
                return Err(ConfigError::Missing {
                    what,
                    path: path.clone(),
                    dir: dir.clone(),
                });
            }
        }
        if let Endpoint::Unix(p) = &self.endpoint
            && !p.exists()
        {
            return Err(ConfigError::NoSocket(p.clone()));
        }
        Ok(())
    }
}

/// The host of `host:port` or `[v6]:port`.
fn host_of(addr: &str) -> String {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest).to_owned();
    }
    addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_handles_v4_v6_and_names() {
        assert_eq!(host_of("127.0.0.1:8443"), "127.0.0.1");
        assert_eq!(host_of("[::1]:8443"), "::1");
        assert_eq!(host_of("localhost:1"), "localhost");
    }

    #[test]
    fn flags_win_and_missing_files_are_explained() {
        let tmp = std::env::temp_dir().join(format!("aurae-client-test-{}", std::process::id()));
        let o = Overrides {
            config: None,
            socket: Some(tmp.join("s.sock")),
            endpoint: None,
            pki_dir: Some(tmp.clone()),
            identity: Some("alice".into()),
            server_name: None,
        };
        let c = ClientConfig::resolve(&o).unwrap();
        assert_eq!(c.cert, tmp.join("alice.pem"));
        assert_eq!(c.server_name, "localhost");
        let msg = c.check_files().unwrap_err().to_string();
        assert!(
            msg.contains("ca.pem") && msg.contains("aer pki init --dir"),
            "{msg}"
        );
        let both = Overrides {
            endpoint: Some("127.0.0.1:1".into()),
            ..o
        };
        assert!(matches!(
            ClientConfig::resolve(&both),
            Err(ConfigError::BothEndpoints)
        ));
    }
}
