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
        /// The PKI directory to create (it must not hold a PKI yet), e.g. /tmp/aurae/pki.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Where the CA key ca.key goes, never inside DIR, e.g. /root/aurae-ca [default:
        /// DIR-ca, beside DIR].
        #[arg(long, value_name = "DIR")]
        ca_key_dir: Option<PathBuf>,
        /// The SPIFFE trust domain of every identity this CA issues, e.g. example.org.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN, value_name = "DOMAIN")]
        trust_domain: String,
        /// Extra DNS name or IP address for auraed's certificate (repeatable), e.g.
        /// --san 10.0.0.5 --san node1.example.org.
        #[arg(long = "san", value_name = "NAME|IP")]
        sans: Vec<String>,
    },
    /// Issue a client identity NAME.pem/NAME.key in DIR, signed by the CA of DIR.
    Issue {
        /// The PKI directory (made by `aer pki init`), e.g. /tmp/aurae/pki.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Where the CA key ca.key is, e.g. /root/aurae-ca [default: DIR-ca, beside DIR].
        #[arg(long, value_name = "DIR")]
        ca_key_dir: Option<PathBuf>,
        /// The identity's file name in DIR (NAME.pem, NAME.key), e.g. alice; `aer
        /// --identity NAME` presents it.
        #[arg(long, value_name = "NAME")]
        name: String,
        /// Its SPIFFE ID path, e.g. /operator/alice [default: /operator/NAME].
        #[arg(long, value_name = "PATH")]
        path: Option<String>,
        /// How long the certificate is valid, in days, e.g. 30.
        #[arg(long, default_value_t = 365, value_name = "DAYS")]
        days: i64,
    },
    /// (Re)issue the daemon's signing certificate signer.pem/signer.key in DIR for node
    /// NAME (SPIFFE ID /instance/NAME), signed by the CA of DIR: the intermediate CA with
    /// which that auraed mints its spawned instances' identities. Give each daemon that
    /// spawns instances its own node name.
    Signer {
        /// The PKI directory of the daemon, e.g. /etc/aurae/pki.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The node name, one SPIFFE path segment, e.g. node-2 (`aer pki init` uses node).
        #[arg(long, value_name = "NAME")]
        node: String,
        /// Where the CA key ca.key is, e.g. /root/aurae-ca [default: DIR-ca, beside DIR].
        #[arg(long, value_name = "DIR")]
        ca_key_dir: Option<PathBuf>,
        /// How long the signing certificate is valid, in days, e.g. 365.
        #[arg(long, default_value_t = 365, value_name = "DAYS")]
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
        PkiCmd::Signer {
            dir,
            node,
            ca_key_dir,
            days,
        } => signer(dir, &paths(dir, ca_key_dir.as_deref()), node, *days, fmt),
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

/// The trust domain of the CA of the PKI directory `dir` (its ca.pem's SPIFFE ID).
fn trust_domain(dir: &Path) -> anyhow::Result<String> {
    let ca = tls::load_certs(&dir.join("ca.pem"))?;
    ca.first().and_then(tls::ca_trust_domain).ok_or_else(|| {
        anyhow!(
            "{}: the CA certificate names no trust domain",
            dir.display()
        )
    })
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
    let td = trust_domain(dir)?;
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

/// (Re)issues node NODE's signing certificate in `dir`, in the trust domain of its CA.
fn signer(dir: &Path, paths: &PkiPaths, node: &str, days: i64, fmt: Format) -> anyhow::Result<()> {
    let td = trust_domain(dir)?;
    let id = Pki::issue_signer_paths(paths, &td, node, days)?;
    let row = vec![
        ("id", json!(id.to_string())),
        ("cert", json!(paths.signer_cert)),
        ("key", json!(paths.signer_key)),
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

    #[test]
    fn pki_signer_parses_with_defaults() {
        let Command::Pki(PkiCmd::Signer {
            dir,
            node,
            ca_key_dir,
            days,
        }) = parse("pki signer --dir /tmp/p --node node-2").unwrap()
        else {
            panic!("not pki signer")
        };
        assert_eq!(dir, Path::new("/tmp/p"));
        assert_eq!((node.as_str(), ca_key_dir, days), ("node-2", None, 365));
        let Command::Pki(PkiCmd::Signer {
            ca_key_dir, days, ..
        }) = parse("pki signer --dir /tmp/p --node n --ca-key-dir /k --days 30").unwrap()
        else {
            panic!("not pki signer")
        };
        assert_eq!((ca_key_dir.as_deref(), days), (Some(Path::new("/k")), 30));
        assert!(
            parse("pki signer --dir /tmp/p").is_err(),
            "--node is required"
        );
        assert!(parse("pki signer --node n").is_err(), "--dir is required");
    }

    /// `aer pki signer` replaces the signing certificate `aer pki init` wrote, for the new
    /// node name, in the CA's trust domain.
    #[test]
    fn pki_signer_reissues_for_the_node() {
        let base = std::env::temp_dir().join(format!("aer-pki-signer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dir = base.join("pki");
        let p = paths(&dir, Some(&base.join("ca")));
        Pki::init_paths(&p, "example.org", &[]).unwrap();
        let before = std::fs::read(&p.signer_cert).unwrap();
        signer(&dir, &p, "node-2", 30, Format::Json).unwrap();
        let after = std::fs::read(&p.signer_cert).unwrap();
        assert_ne!(before, after);
        let chain = tls::load_certs(&p.signer_cert).unwrap();
        let id = tls::peer_spiffe_id(&chain[0]).unwrap();
        assert_eq!(id.to_string(), "spiffe://example.org/instance/node-2");
        assert!(
            signer(&dir, &p, "a/b", 30, Format::Json).is_err(),
            "a node is one segment"
        );
        let no_key = paths(&dir, Some(&base.join("elsewhere")));
        assert!(signer(&dir, &no_key, "n", 30, Format::Json).is_err());
        let _ = std::fs::remove_dir_all(&base);
    }
}
