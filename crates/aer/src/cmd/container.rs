//! Containers: `aer run-cell` (RunCell: an image in a new cell) and the container options
//! it shares with `aer run --image` (a sidecar in an existing cell).

use std::{collections::HashMap, process::ExitCode};

use anyhow::anyhow;
use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use clap::Args;
use tonic::Status;

use super::{
    attach::{AttachArgs, Made, Started, launch},
    cell::{LimitArgs, NsArgs},
    env_pairs, invalid,
};
use crate::output::Format;

/// Container options shared by `aer run --image` and `aer run-cell`.
#[derive(Debug, Args)]
pub struct ContainerArgs {
    /// Override the image's entrypoint, one word per flag, e.g. --entrypoint sh
    /// --entrypoint=-c [default: the image's].
    #[arg(long, value_name = "WORD")]
    entrypoint: Vec<String>,
    /// Override the image's working directory, an absolute path inside the container, e.g.
    /// /data [default: the image's, else /].
    #[arg(long, value_name = "DIR")]
    workdir: Option<String>,
    /// Mount the image's root filesystem read-only (volumes keep their own mode).
    #[arg(long)]
    read_only: bool,
    /// Run with no_new_privs (setuid and file capabilities grant nothing), even where the
    /// caller's grant would allow new privileges.
    #[arg(long)]
    no_new_privileges: bool,
    /// A host directory to mount, HOST:CONTAINER[:ro|:rw], e.g. -v /srv/volumes/data:/data:ro;
    /// HOST must lie under one of auraed's --volume-root (repeatable; default rw).
    #[arg(long = "volume", short = 'v', value_name = "HOST:CONTAINER[:ro]")]
    volumes: Vec<String>,
    /// A directory of the cell, NAME:CONTAINER[:ro|:rw], e.g. --cell-dir cache:/cache:
    /// made empty by the first container of the cell naming it, shared by the cell's
    /// containers naming it, removed with the cell (a pod's emptyDir; repeatable).
    #[arg(long = "cell-dir", value_name = "NAME:CONTAINER[:ro]")]
    cell_dirs: Vec<String>,
    /// A name server for the container's /etc/resolv.conf, e.g. --dns 10.96.0.10
    /// (repeatable, at most 3; any --dns* flag replaces the image's file).
    #[arg(long = "dns", value_name = "IP")]
    dns_servers: Vec<String>,
    /// A search domain for /etc/resolv.conf, e.g. --dns-search svc.cluster.local
    /// (repeatable).
    #[arg(long = "dns-search", value_name = "DOMAIN")]
    dns_searches: Vec<String>,
    /// A resolver option for /etc/resolv.conf, e.g. --dns-option ndots:5 (repeatable).
    #[arg(long = "dns-option", value_name = "OPT")]
    dns_options: Vec<String>,
}

impl ContainerArgs {
    /// The container to run: `image` with these overrides, `args` replacing its cmd.
    pub fn proto(
        &self,
        image: String,
        args: Vec<String>,
        env: HashMap<String, String>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> anyhow::Result<pb::Container> {
        Ok(pb::Container {
            image,
            entrypoint: self.entrypoint.clone(),
            args,
            env,
            working_dir: self.workdir.clone().unwrap_or_default(),
            uid,
            gid,
            read_only_root: self.read_only,
            volumes: self
                .volumes
                .iter()
                .map(|v| volume(v))
                .collect::<anyhow::Result<_>>()?,
            no_new_privileges: self.no_new_privileges,
            dns: (!(self.dns_servers.is_empty()
                && self.dns_searches.is_empty()
                && self.dns_options.is_empty()))
            .then(|| pb::ContainerDns {
                servers: self.dns_servers.clone(),
                searches: self.dns_searches.clone(),
                options: self.dns_options.clone(),
            }),
            files: Vec::new(),
            cell_directories: self
                .cell_dirs
                .iter()
                .map(|v| cell_dir(v))
                .collect::<anyhow::Result<_>>()?,
        })
    }
}

/// `SOURCE:CONTAINER`, `SOURCE:CONTAINER:ro` or `SOURCE:CONTAINER:rw` as given to `flag`
/// (`use` names the form in the error): the source, the container path, read-only.
fn mount_arg<'a>(flag: &str, form: &str, v: &'a str) -> anyhow::Result<(&'a str, &'a str, bool)> {
    match v.split(':').collect::<Vec<_>>().as_slice() {
        [s, c] | [s, c, "rw"] => Ok((s, c, false)),
        [s, c, "ro"] => Ok((s, c, true)),
        _ => Err(anyhow!("{flag} {v}: use {form}")),
    }
}

/// `NAME:CONTAINER`, `NAME:CONTAINER:ro` or `NAME:CONTAINER:rw`.
fn cell_dir(v: &str) -> anyhow::Result<pb::CellDirectory> {
    let (name, path, read_only) = mount_arg("--cell-dir", "NAME:CONTAINER[:ro]", v)?;
    Ok(pb::CellDirectory {
        name: name.to_owned(),
        path: path.to_owned(),
        read_only,
    })
}

/// `HOST:CONTAINER`, `HOST:CONTAINER:ro` or `HOST:CONTAINER:rw`.
fn volume(v: &str) -> anyhow::Result<pb::Volume> {
    let (host, container, read_only) = mount_arg("--volume", "HOST:CONTAINER[:ro]", v)?;
    Ok(pb::Volume {
        host_path: host.to_owned(),
        container_path: container.to_owned(),
        read_only,
    })
}

#[derive(Debug, Args)]
#[command(after_help = super::attach::AFTER_HELP)]
pub struct RunCellArgs {
    /// The new cell's name, a DNS label, e.g. web; its container's executable is
    /// NAME/IMAGE-NAME (the last part of the repository), e.g. web/busybox.
    name: String,
    /// The image to run, a reference with its registry, e.g.
    /// 127.0.0.1:5000/aurae/busybox:latest (pulled if auraed does not hold it yet).
    #[arg(long, value_name = "REF")]
    image: String,
    /// An environment variable, KEY=VALUE, added to the image's (repeatable), e.g. -e
    /// MODE=test.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// The uid the container runs as, e.g. 1000 [default: the image's user; 0 needs a
    /// policy grant (allow_uid_zero)].
    #[arg(long)]
    uid: Option<u32>,
    /// The gid the container runs as, e.g. 1000 [default: the image's group; 0 needs a
    /// policy grant].
    #[arg(long)]
    gid: Option<u32>,
    #[command(flatten)]
    container: ContainerArgs,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    ns: NsArgs,
    #[command(flatten)]
    attach: AttachArgs,
    /// Arguments overriding the image's cmd, after `--`, e.g. -- sh -c 'exit 3'
    /// [default: the image's cmd].
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

impl RunCellArgs {
    fn proto(self) -> anyhow::Result<pb::Cell> {
        let limits = self.limits.proto()?;
        let namespaces = self.ns.proto()?;
        let env = env_pairs(&self.env)?;
        let container = self
            .container
            .proto(self.image, self.args, env, self.uid, self.gid)?;
        Ok(pb::Cell {
            name: self.name,
            limits: Some(limits),
            namespaces: Some(namespaces),
            container: Some(container),
            ..Default::default()
        })
    }
}

/// `aer run-cell`: a new cell running one container; then streams its output and exits
/// with its exit code (see [`super::attach`]), or with `-d` prints its id.
pub async fn run(c: &Client, mut a: RunCellArgs, fmt: Format) -> ExitCode {
    let attach = std::mem::take(&mut a.attach);
    let create = async {
        let mut cell = a.proto().map_err(invalid)?;
        cell.run = attach.run_options();
        let name = cell.name.clone();
        let s = c.runtime().run_cell(cell).await?.into_inner();
        // Its one executable: the container (named after the image).
        let exe = s
            .executables
            .iter()
            .find(|e| e.cell == s.name)
            .cloned()
            .ok_or_else(|| {
                Status::internal(format!(
                    "RunCell answered cell {name:?} with no executable in it"
                ))
            })?;
        Ok(Started {
            exe,
            made: Made::Cell(s.name, s.created_at),
            image_digest: s.image_digest,
        })
    };
    launch(c, &attach, fmt, create).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Command, parse};

    fn run_cell(line: &str) -> anyhow::Result<pb::Cell> {
        let Command::RunCell(a) = parse(line).unwrap() else {
            panic!("not aer run-cell")
        };
        a.proto()
    }

    #[test]
    fn run_cell_builds_the_container() {
        let cell = run_cell(
            "run-cell job --image reg/busybox:1 --read-only -v /srv/a:/a --volume /srv/b:/b:ro \
             -v /srv/c:/c:rw --uid 1000 --entrypoint sh --entrypoint=-c --workdir /w -e K=V \
             --memory-max 64M -- 'date > /a/x'",
        )
        .unwrap();
        assert_eq!(cell.name, "job");
        assert_eq!(cell.limits.unwrap().memory_max_bytes, Some(64 << 20));
        let c = cell.container.unwrap();
        assert_eq!(c.image, "reg/busybox:1");
        assert_eq!(c.entrypoint, ["sh", "-c"]);
        assert_eq!(c.args, ["date > /a/x"]);
        assert_eq!(
            (c.working_dir.as_str(), c.uid, c.gid),
            ("/w", Some(1000), None)
        );
        assert!(c.read_only_root && !c.no_new_privileges);
        assert_eq!(c.env["K"], "V");
        let v: Vec<_> = c
            .volumes
            .iter()
            .map(|v| (v.host_path.as_str(), v.container_path.as_str(), v.read_only))
            .collect();
        assert_eq!(
            v,
            [
                ("/srv/a", "/a", false),
                ("/srv/b", "/b", true),
                ("/srv/c", "/c", false)
            ]
        );
    }

    #[test]
    fn run_cell_asks_for_no_new_privileges() {
        let c = run_cell("run-cell j --image i --no-new-privileges").unwrap();
        assert!(c.container.unwrap().no_new_privileges);
    }

    #[test]
    fn run_cell_refuses_bad_volumes_and_env() {
        let e = run_cell("run-cell j --image i -v /a").unwrap_err();
        assert_eq!(e.to_string(), "--volume /a: use HOST:CONTAINER[:ro]");
        assert!(run_cell("run-cell j --image i -v /a:/b:x").is_err());
        assert!(run_cell("run-cell j --image i -e NOEQ").is_err());
        assert!(parse("run-cell j").is_err(), "--image is required");
    }
}
