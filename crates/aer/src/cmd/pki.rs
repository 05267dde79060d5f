//! `aer pki …`: the development PKI, made and extended locally (no daemon).

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use aurae_identity::{Pki, PkiPaths, SpiffeId, pki::DEFAULT_TRUST_DOMAIN, tls};
use clap::Subcommand;
use serde_json::json;

use crate::output::{Format, print};

#[derive(Debug, Subcommand)]
pub enum PkiCmd {
    /// Create a CA, auraed's identity and the admin identity in DIR; the CA key goes to
    /// its own directory outside DIR (auraed refuses to start next to it).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Where the CA key ca.key goes; never inside DIR [default: DIR-ca, beside DIR].
        #[arg(long)]
        ca_key_dir: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Extra DNS name or IP address for auraed's certificate (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// Issue a client identity NAME.pem/NAME.key in DIR, signed by the CA of DIR.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// Where the CA key ca.key is [default: DIR-ca, beside DIR].
        #[arg(long)]
        ca_key_dir: Option<PathBuf>,
        #[arg(long)]
        name: String,
        /// Its SPIFFE ID path, e.g. /operator/alice [default: /operator/NAME].
        #[arg(long)]
        path: Option<String>,
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
}

pub fn run(cmd: &PkiCmd, fmt: Format) -> anyhow::Result<()> {
    match cmd {
        PkiCmd::Init {
            dir,
            ca_key_dir,
            trust_domain,
            sans,
        } => init(&paths(dir, ca_key_dir.as_deref()), trust_domain, sans, fmt),
        PkiCmd::Issue {
            dir,
            ca_key_dir,
            name,
            path,
            days,
        } => {
            let path = path.clone().unwrap_or_else(|| format!("/operator/{name}"));
            issue(
                dir,
                &paths(dir, ca_key_dir.as_deref()),
                name,
                &path,
                *days,
                fmt,
            )
        }
    }
}

fn paths(dir: &Path, ca_key_dir: Option<&Path>) -> PkiPaths {
    match ca_key_dir {
        Some(k) => PkiPaths::with_ca_key_dir(dir, k),
        None => PkiPaths::new(dir),
    }
}

fn init(paths: &PkiPaths, trust_domain: &str, sans: &[String], fmt: Format) -> anyhow::Result<()> {
    let p = Pki::init_paths(paths, trust_domain, sans)?;
    let row = vec![
        ("dir", json!(p.dir)),
        ("ca", json!(p.ca_cert)),
        ("ca_key", json!(p.ca_key)),
        ("server", json!(p.server_cert)),
        (
            "server_id",
            json!(format!("spiffe://{trust_domain}/auraed")),
        ),
        ("admin", json!(p.admin_cert)),
        (
            "admin_id",
            json!(format!("spiffe://{trust_domain}/operator/admin")),
        ),
    ];
    print(fmt, &[row], true);
    Ok(())
}

/// Issues NAME with the SPIFFE ID `spiffe://<the CA's trust domain><path>`.
fn issue(
    dir: &Path,
    paths: &PkiPaths,
    name: &str,
    path: &str,
    days: i64,
    fmt: Format,
) -> anyhow::Result<()> {
    let ca = tls::load_certs(&dir.join("ca.pem"))?;
    let td = ca.first().and_then(tls::ca_trust_domain).ok_or_else(|| {
        anyhow!(
            "{}: the CA certificate names no trust domain",
            dir.display()
        )
    })?;
    let id = SpiffeId::new(&td, path)?;
    let (cert, key) = Pki::issue_client_paths(paths, name, &id, days)?;
    let row = vec![
        ("id", json!(id.to_string())),
        ("cert", json!(cert)),
        ("key", json!(key)),
    ];
    print(fmt, &[row], true);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Command, parse};

    #[test]
    fn pki_commands_parse_with_defaults() {
        let Command::Pki(PkiCmd::Init {
            dir,
            ca_key_dir,
            trust_domain,
            sans,
        }) = parse("pki init --dir /tmp/p --san 10.0.0.1 --san h").unwrap()
        else {
            panic!("not pki init")
        };
        assert_eq!(dir, Path::new("/tmp/p"));
        assert_eq!(
            (ca_key_dir, trust_domain.as_str()),
            (None, DEFAULT_TRUST_DOMAIN)
        );
        assert_eq!(sans, ["10.0.0.1", "h"]);
        let Command::Pki(PkiCmd::Issue {
            name, path, days, ..
        }) = parse("pki issue --dir /tmp/p --name alice").unwrap()
        else {
            panic!("not pki issue")
        };
        assert_eq!((name.as_str(), path, days), ("alice", None, 365));
        assert!(
            parse("pki issue --dir /tmp/p").is_err(),
            "--name is required"
        );
    }
}
