//! auraed's configuration file (`auraed --config /etc/aurae/auraed.toml`, or
//! `AURAED_CONFIG`): every command-line option of auraed under its long name in snake_case
//! (`--state-dir` is `state_dir`, `--insecure-registry` is `insecure_registry`, a list).
//!
//! ```toml
//! pki_dir = "/etc/aurae/pki"
//! state_dir = "/var/lib/aurae"
//! listen = "127.0.0.1:8443"
//! insecure_registry = ["127.0.0.1:5000"]
//! ```
//!
//! What the user gives wins over the file: a command-line flag, then its environment
//! variable, then the file, then the built-in default. A key auraed does not know is an
//! error naming it and the file (a typo must not silently fall back to a default), and
//! so is a value of the wrong type. Relative paths in the file are taken from the file's
//! own directory (relative flags and environment variables from the working directory):
//! auraed makes every path absolute once, at start.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// Every key the file takes: auraed's long options (without `config`), in snake_case.
pub const KEYS: &[&str] = &[
    "pki_dir",
    "socket",
    "listen",
    "metrics_listen",
    "cri_socket",
    "cri_identity",
    "cni_conf_dir",
    "cni_bin_dir",
    "cri_log_root",
    "cri_stream_address",
    "state_dir",
    "policy",
    "handshake_timeout_s",
    "max_connections",
    "max_handshakes_per_peer",
    "max_connections_per_identity",
    "max_streams_per_connection",
    "cell_pool",
    "cgroup_root",
    "insecure_registry",
    "registry_auth",
    "registry_ca",
    "volume_root",
    "vm_image_root",
    "vm_kernel_as_given",
    "instance_kernel",
    "instance_modules",
    "no_pid1",
    "log_json",
];

/// The file's settings; `None`: not in the file. Paths are absolute once [`FileConfig::load`]
/// returns them (relative ones are taken from the file's directory).
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub pki_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub cri_socket: Option<PathBuf>,
    pub cri_identity: Option<String>,
    pub cni_conf_dir: Option<PathBuf>,
    pub cni_bin_dir: Option<Vec<PathBuf>>,
    pub cri_log_root: Option<PathBuf>,
    pub cri_stream_address: Option<SocketAddr>,
    pub state_dir: Option<PathBuf>,
    pub policy: Option<PathBuf>,
    pub handshake_timeout_s: Option<u64>,
    pub max_connections: Option<usize>,
    pub max_handshakes_per_peer: Option<usize>,
    pub max_connections_per_identity: Option<usize>,
    pub max_streams_per_connection: Option<u32>,
    pub cell_pool: Option<usize>,
    pub cgroup_root: Option<PathBuf>,
    pub insecure_registry: Option<Vec<String>>,
    pub registry_auth: Option<PathBuf>,
    pub registry_ca: Option<PathBuf>,
    pub volume_root: Option<Vec<PathBuf>>,
    pub vm_image_root: Option<Vec<PathBuf>>,
    pub vm_kernel_as_given: Option<bool>,
    pub instance_kernel: Option<PathBuf>,
    pub instance_modules: Option<PathBuf>,
    pub no_pid1: Option<bool>,
    pub log_json: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: line {line}: not valid TOML: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error(
        "config file {path}: unknown key `{key}` (the file takes auraed's options in snake_case: {})",
        KEYS.join(", ")
    )]
    UnknownKey { path: PathBuf, key: String },
    #[error("config file {path}: key `{key}`: {message}")]
    Value {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("config file {path}: key `{key}`: path {value:?} {reason}")]
    Path {
        path: PathBuf,
        key: String,
        value: PathBuf,
        reason: String,
    },
    #[error("config file {path}: {reason}")]
    ConfigPath { path: PathBuf, reason: String },
}

/// `p` as an absolute path, relative ones taken from `base` (itself absolute); refuses
/// what no absolute path can be made of (empty, a NUL byte).
pub fn absolute_from(base: &Path, p: &Path) -> Result<PathBuf, String> {
    if p.as_os_str().is_empty() {
        return Err("is empty: give an absolute path or one relative to the base".into());
    }
    if p.as_os_str().as_encoded_bytes().contains(&0) {
        return Err("contains a NUL byte".into());
    }
    if p.is_absolute() {
        return Ok(p.to_owned());
    }
    if !base.is_absolute() {
        return Err(format!(
            "is relative and its base {} is not absolute",
            base.display()
        ));
    }
    Ok(base.join(p))
}

/// `p` as an absolute path, a relative one taken from the working directory; refuses an
/// empty path, a NUL byte, or a working directory that cannot be read (removed).
pub fn absolute(p: &Path) -> Result<PathBuf, String> {
    if p.is_absolute() || p.as_os_str().is_empty() {
        return absolute_from(Path::new("/"), p);
    }
    let cwd = std::env::current_dir().map_err(|e| {
        format!("is relative and the working directory cannot be read ({e}): give an absolute path")
    })?;
    absolute_from(&cwd, p)
}

/// The line (1-based) of byte offset `at` in `text`.
/// The config file decides auraed's PKI, policy and kernel: whoever may write it controls
/// auraed. It must be a regular file owned by root or by auraed's own user, and not
/// writable by group or others (it holds no secrets: reading is not checked).
pub fn check_owner_and_mode(md: &fs::Metadata, euid: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if !md.is_file() {
        return Err("is not a regular file".into());
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "mode {mode:o} lets group or others write it, and the file decides auraed's PKI,              policy and kernel: chmod go-w it"
        ));
    }
    if md.uid() != 0 && md.uid() != euid {
        return Err(format!(
            "is owned by uid {}, neither root nor auraed's uid {euid}: that user could              rewrite auraed's PKI, policy and kernel; chown it",
            md.uid()
        ));
    }
    Ok(())
}

fn line_of(text: &str, at: usize) -> usize {
    text.get(..at)
        .map(|s| s.bytes().filter(|b| *b == b'\n').count() + 1)
        .unwrap_or(1)
}

impl FileConfig {
    /// Reads the file at `path` (relative: from the working directory); its relative
    /// paths are made absolute from its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let path = absolute(path).map_err(|reason| ConfigError::ConfigPath {
            path: path.to_owned(),
            reason: format!("path {reason}"),
        })?;
        let md = fs::metadata(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        check_owner_and_mode(&md, nix::unistd::geteuid().as_raw()).map_err(|reason| {
            ConfigError::ConfigPath {
                path: path.clone(),
                reason,
            }
        })?;
        let text = fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("/")).to_owned();
        Self::parse(&text, &path, &base)
    }

    /// Parses a file's text; `origin` names it in errors, `base` is where its relative
    /// paths start (absolute).
    pub fn parse(text: &str, origin: &Path, base: &Path) -> Result<Self, ConfigError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: origin.to_owned(),
            line: e.span().map(|s| line_of(text, s.start)).unwrap_or(1),
            message: e.message().trim().to_owned(),
        })?;
        if let Some(key) = table.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(ConfigError::UnknownKey {
                path: origin.to_owned(),
                key: key.clone(),
            });
        }
        // One key at a time, so a wrong type names its key.
        for (key, value) in &table {
            let mut one = toml::Table::new();
            one.insert(key.clone(), value.clone());
            toml::Value::Table(one)
                .try_into::<FileConfig>()
                .map_err(|e| ConfigError::Value {
                    path: origin.to_owned(),
                    key: key.clone(),
                    message: e.message().trim().to_owned(),
                })?;
        }
        let mut file: FileConfig =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Value {
                    path: origin.to_owned(),
                    key: "?".into(),
                    message: e.message().trim().to_owned(),
                })?;
        for (key, p) in file.paths_mut() {
            *p = absolute_from(base, p).map_err(|reason| ConfigError::Path {
                path: origin.to_owned(),
                key: key.to_owned(),
                value: p.clone(),
                reason,
            })?;
        }
        Ok(file)
    }

    /// Every path the file set, with its key.
    fn paths_mut(&mut self) -> Vec<(&'static str, &mut PathBuf)> {
        let mut out: Vec<(&'static str, &mut PathBuf)> = Vec::new();
        for (key, p) in [
            ("pki_dir", &mut self.pki_dir),
            ("socket", &mut self.socket),
            ("state_dir", &mut self.state_dir),
            ("policy", &mut self.policy),
            ("cgroup_root", &mut self.cgroup_root),
            ("registry_auth", &mut self.registry_auth),
            ("registry_ca", &mut self.registry_ca),
            ("instance_kernel", &mut self.instance_kernel),
            ("instance_modules", &mut self.instance_modules),
            ("cri_socket", &mut self.cri_socket),
            ("cni_conf_dir", &mut self.cni_conf_dir),
            ("cri_log_root", &mut self.cri_log_root),
        ] {
            out.extend(p.as_mut().map(|p| (key, p)));
        }
        for (key, list) in [
            ("volume_root", &mut self.volume_root),
            ("vm_image_root", &mut self.vm_image_root),
            ("cni_bin_dir", &mut self.cni_bin_dir),
        ] {
            out.extend(list.iter_mut().flatten().map(|p| (key, p)));
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        FileConfig::parse(
            text,
            Path::new("/etc/aurae/auraed.toml"),
            Path::new("/etc/aurae"),
        )
    }

    /// The keys serde's derive accepts, read from its "expected one of" list.
    fn serde_keys() -> Vec<String> {
        let e = toml::Value::Table(toml::Table::from_iter([(
            "zz_not_a_key".to_owned(),
            toml::Value::Integer(1),
        )]))
        .try_into::<FileConfig>()
        .unwrap_err();
        let msg = e.message().to_owned();
        let list = msg.split_once("expected one of").expect(&msg).1;
        list.split(',')
            .map(|s| s.trim().trim_matches('`').to_owned())
            .collect()
    }

    #[test]
    fn keys_are_exactly_the_fields_serde_takes() {
        let mut a = serde_keys();
        let mut b: Vec<String> = KEYS.iter().map(|s| (*s).to_owned()).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b);
    }

    #[test]
    fn a_full_file_parses_and_relative_paths_start_at_its_directory() {
        let f = parse(
            r#"
pki_dir = "pki"
socket = "/run/aurae/auraed.sock"
state_dir = "../var/state"
listen = "127.0.0.1:8443"
insecure_registry = ["127.0.0.1:5000"]
volume_root = ["vols", "/srv/vols"]
max_connections = 64
no_pid1 = true
"#,
        )
        .unwrap();
        assert_eq!(f.pki_dir.as_deref(), Some(Path::new("/etc/aurae/pki")));
        assert_eq!(
            f.state_dir.as_deref(),
            Some(Path::new("/etc/aurae/../var/state"))
        );
        assert_eq!(
            f.socket.as_deref(),
            Some(Path::new("/run/aurae/auraed.sock"))
        );
        assert_eq!(f.listen, Some("127.0.0.1:8443".parse().unwrap()));
        assert_eq!(f.insecure_registry, Some(vec!["127.0.0.1:5000".to_owned()]));
        assert_eq!(
            f.volume_root,
            Some(vec![
                PathBuf::from("/etc/aurae/vols"),
                PathBuf::from("/srv/vols")
            ])
        );
        assert_eq!(f.max_connections, Some(64));
        assert_eq!(f.no_pid1, Some(true));
        assert_eq!(f.policy, None);
    }

    #[test]
    fn an_unknown_key_is_named_with_the_file() {
        let e = parse("state_dir = \"/x\"\nstate-dir = \"/y\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key `state-dir`"), "{e}");
        assert!(e.contains("/etc/aurae/auraed.toml"), "{e}");
    }

    #[test]
    fn a_wrong_type_names_its_key() {
        for (text, key) in [
            ("max_connections = \"many\"", "max_connections"),
            ("listen = \"localhost\"", "listen"),
            (
                "insecure_registry = \"127.0.0.1:5000\"",
                "insecure_registry",
            ),
            ("no_pid1 = 1", "no_pid1"),
            (
                "max_streams_per_connection = -1",
                "max_streams_per_connection",
            ),
        ] {
            let e = parse(&format!("state_dir = \"/x\"\n{text}\n")).unwrap_err();
            assert!(
                matches!(&e, ConfigError::Value { key: k, .. } if k == key),
                "{e}"
            );
            let s = e.to_string();
            assert!(s.contains(&format!("key `{key}`")), "{s}");
            assert!(!s.contains('\n'), "one line: {s}");
        }
    }

    #[test]
    fn bad_toml_says_the_line() {
        let e = parse("state_dir = \"/x\"\nlisten = \n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn an_empty_path_is_refused_naming_its_key() {
        let e = parse("state_dir = \"\"").unwrap_err().to_string();
        assert!(e.contains("key `state_dir`") && e.contains("empty"), "{e}");
        let e = parse("volume_root = [\"/a\", \"\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `volume_root`"), "{e}");
    }

    #[test]
    fn absolute_refuses_what_cannot_be_made_absolute() {
        assert!(absolute(Path::new("")).is_err());
        assert!(absolute_from(Path::new("rel"), Path::new("x")).is_err());
        assert_eq!(
            absolute_from(Path::new("/base"), Path::new("x/y")).unwrap(),
            PathBuf::from("/base/x/y")
        );
        assert_eq!(absolute(Path::new("/a/b")).unwrap(), PathBuf::from("/a/b"));
        assert!(absolute(Path::new("a")).unwrap().is_absolute());
    }

    #[test]
    fn a_config_file_others_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auraed.toml");
        fs::write(&file, "log_json = true\n").unwrap();
        for (mode, ok) in [(0o600, true), (0o644, true), (0o664, false), (0o646, false)] {
            fs::set_permissions(&file, fs::Permissions::from_mode(mode)).unwrap();
            let r = FileConfig::load(&file);
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
            if let Err(e) = r {
                let e = e.to_string();
                assert!(e.contains(&file.display().to_string()), "{e}");
                assert!(e.contains("chmod go-w"), "{e}");
            }
        }
        // A directory is not a config file.
        let e = FileConfig::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn a_config_file_of_another_user_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auraed.toml");
        fs::write(&file, "log_json = true\n").unwrap();
        let md = fs::metadata(&file).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        assert!(check_owner_and_mode(&md, me).is_ok());
        // As seen by an auraed of another (non-root) uid, a file of ours is foreign,
        // unless ours is root.
        let other = me.wrapping_add(4242);
        let r = check_owner_and_mode(&md, other);
        if me == 0 {
            assert!(r.is_ok(), "{r:?}");
        } else {
            assert!(r.unwrap_err().contains(&format!("owned by uid {me}")));
        }
        if me == 0 {
            nix::unistd::chown(&file, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            let e = FileConfig::load(&file).unwrap_err().to_string();
            assert!(e.contains("owned by uid 65534"), "{e}");
        } else {
            println!("SKIP a_config_file_of_another_user_is_refused (chown): needs root");
        }
    }
}
