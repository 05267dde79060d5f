//! A small CRI client for trying auraed's `--cri-socket` by hand (the README's
//! walkthrough), the few `crictl` verbs a pod's life needs, on the published CRI proto:
//!
//! ```text
//! aurae-cri [--socket PATH] version | images | pull IMAGE
//!   | runp NAME [--namespace NS] [--log-dir DIR] [--dns IP] [--dns-search DOMAIN]
//!                                                     prints the sandbox id
//!   | create SANDBOX NAME IMAGE -- CMD [ARG…]          prints the container id
//!   | start ID | stop ID [--timeout S] | rm ID
//!   | exec [-i] ID -- CMD [ARG…]                        its output; exits with its code
//!                                                     (-i: streamed, stdin sent)
//!   | port-forward SANDBOX PORT                         stdin to the pod's PORT, the answer out
//!   | pods | ps | inspectp ID | inspect ID | stopp ID | rmp ID
//! ```
//!
//! The socket defaults to `/run/aurae/cri.sock`. A container's log is
//! `<the sandbox's log dir>/<NAME>/0.log` (the directory is made, as kubelet makes it).
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, bail};
use aurae_proto::cri::v1 as cri;

const USAGE: &str = "usage: aurae-cri [--socket PATH] version | images | pull IMAGE | \
runp NAME [--namespace NS] [--log-dir DIR] [--dns IP] [--dns-search DOMAIN] | create SANDBOX NAME IMAGE -- CMD [ARG...] | \
start ID | stop ID [--timeout S] | rm ID | exec [-i] ID -- CMD [ARG...] | port-forward SANDBOX PORT | pods | ps | inspectp ID | inspect ID | stopp ID | rmp ID";

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut socket = PathBuf::from("/run/aurae/cri.sock");
    if args.first().map(String::as_str) == Some("--socket") && args.len() >= 2 {
        socket = PathBuf::from(args.remove(1));
        args.remove(0);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aurae-cri: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(socket, args)) {
        Ok(code) => ExitCode::from(code),
        Err(e) if e.to_string() == USAGE => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("aurae-cri: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The value after `flag` in `rest`, if given.
fn flag(rest: &[String], name: &str) -> Option<String> {
    rest.iter()
        .position(|a| a == name)
        .and_then(|i| rest.get(i + 1).cloned())
}

fn image(i: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: i.to_owned(),
        ..Default::default()
    })
}

fn state_name(s: i32) -> &'static str {
    cri::ContainerState::try_from(s).map_or("?", |s| match s {
        cri::ContainerState::ContainerCreated => "CREATED",
        cri::ContainerState::ContainerRunning => "RUNNING",
        cri::ContainerState::ContainerExited => "EXITED",
        cri::ContainerState::ContainerUnknown => "UNKNOWN",
    })
}

/// The verb's exit code (exec: the command's).
async fn run(socket: PathBuf, args: Vec<String>) -> anyhow::Result<u8> {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let Some((&verb, rest)) = a.split_first() else {
        bail!(USAGE);
    };
    let (mut rt, mut im) = aurae_testkit::cri::clients(&socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    match (verb, rest) {
        ("version", []) => {
            let v = rt
                .version(cri::VersionRequest::default())
                .await?
                .into_inner();
            println!(
                "{} {} (CRI {})",
                v.runtime_name, v.runtime_version, v.runtime_api_version
            );
        }
        ("images", []) => {
            for i in im
                .list_images(cri::ListImagesRequest::default())
                .await?
                .into_inner()
                .images
            {
                println!("{}  {}  {} bytes", i.id, i.repo_tags.join(","), i.size);
            }
        }
        ("pull", [i]) => {
            let r = im
                .pull_image(cri::PullImageRequest {
                    image: image(i),
                    ..Default::default()
                })
                .await?;
            println!("{}", r.into_inner().image_ref);
        }
        ("runp", [name, ..]) => {
            let ns = flag(&args, "--namespace").unwrap_or_else(|| "default".into());
            let log_dir = flag(&args, "--log-dir").unwrap_or_default();
            if !log_dir.is_empty() {
                std::fs::create_dir_all(&log_dir)?;
            }
            let id = rt
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(cri::PodSandboxConfig {
                        metadata: Some(cri::PodSandboxMetadata {
                            name: (*name).to_owned(),
                            uid: format!("{ns}-{name}"),
                            namespace: ns,
                            attempt: 0,
                        }),
                        hostname: (*name).to_owned(),
                        log_directory: log_dir,
                        // As kubelet sends a pod's DNS policy, worked out.
                        dns_config: flag(&args, "--dns").map(|server| cri::DnsConfig {
                            servers: vec![server],
                            searches: flag(&args, "--dns-search").into_iter().collect(),
                            options: vec!["ndots:5".to_owned()],
                        }),
                        ..Default::default()
                    }),
                    runtime_handler: String::new(),
                })
                .await?
                .into_inner()
                .pod_sandbox_id;
            println!("{id}");
        }
        ("create", [sandbox, name, img, "--", cmd @ ..]) if !cmd.is_empty() => {
            let sb = rt
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: (*sandbox).to_owned(),
                    verbose: true,
                })
                .await?
                .into_inner();
            let id = sb.status.context("no sandbox status")?.id;
            // The sandbox's log directory, from its verbose status (kubelet knows it).
            let log_dir = sb
                .info
                .get("info")
                .and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok())
                .and_then(|v| v["log_directory"].as_str().map(str::to_owned))
                .unwrap_or_default();
            if !log_dir.is_empty() {
                std::fs::create_dir_all(PathBuf::from(&log_dir).join(name))?;
            }
            let id = rt
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: id,
                    config: Some(cri::ContainerConfig {
                        metadata: Some(cri::ContainerMetadata {
                            name: (*name).to_owned(),
                            attempt: 0,
                        }),
                        image: image(img),
                        command: cmd.iter().map(|s| (*s).to_owned()).collect(),
                        log_path: if log_dir.is_empty() {
                            String::new()
                        } else {
                            format!("{name}/0.log")
                        },
                        ..Default::default()
                    }),
                    sandbox_config: None,
                })
                .await?
                .into_inner()
                .container_id;
            println!("{id}");
        }
        ("exec", ["-i", id, "--", cmd @ ..]) if !cmd.is_empty() => {
            // Streamed (Exec + the streaming server, as kubectl exec -i): stdin to its end.
            let url = rt
                .exec(cri::ExecRequest {
                    container_id: (*id).to_owned(),
                    cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
                    stdin: true,
                    stdout: true,
                    stderr: true,
                    tty: false,
                })
                .await?
                .into_inner()
                .url;
            let mut input = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut input)?;
            let out = aurae_testkit::cri::exec_stream(&url, Some(&input)).await?;
            use std::io::Write;
            std::io::stdout().write_all(&out.stdout)?;
            std::io::stderr().write_all(&out.stderr)?;
            let code = out
                .exit_code()
                .with_context(|| format!("the exec ended without an exit code: {}", out.status))?;
            return Ok(u8::try_from(code.clamp(0, 255)).unwrap_or(255));
        }
        ("port-forward", [pod, port]) => {
            // One connection to the pod's loopback PORT: stdin sent, the answer printed.
            let port: u16 = port.parse().context("PORT")?;
            let url = rt
                .port_forward(cri::PortForwardRequest {
                    pod_sandbox_id: (*pod).to_owned(),
                    port: vec![i32::from(port)],
                })
                .await?
                .into_inner()
                .url;
            let mut input = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut input)?;
            let (data, error) = aurae_testkit::cri::port_forward_once(&url, port, &input).await?;
            if !error.is_empty() {
                bail!("{error}");
            }
            use std::io::Write;
            std::io::stdout().write_all(&data)?;
        }
        ("exec", [id, "--", cmd @ ..]) if !cmd.is_empty() => {
            let r = rt
                .exec_sync(cri::ExecSyncRequest {
                    container_id: (*id).to_owned(),
                    cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
                    timeout: 60,
                })
                .await?
                .into_inner();
            use std::io::Write;
            std::io::stdout().write_all(&r.stdout)?;
            std::io::stderr().write_all(&r.stderr)?;
            return Ok(u8::try_from(r.exit_code.clamp(0, 255)).unwrap_or(255));
        }
        ("start", [id]) => {
            rt.start_container(cri::StartContainerRequest {
                container_id: (*id).to_owned(),
            })
            .await?;
        }
        ("stop", [id, ..]) => {
            let timeout = flag(&args, "--timeout").map_or(Ok(10), |t| t.parse())?;
            rt.stop_container(cri::StopContainerRequest {
                container_id: (*id).to_owned(),
                timeout,
            })
            .await?;
        }
        ("rm", [id]) => {
            rt.remove_container(cri::RemoveContainerRequest {
                container_id: (*id).to_owned(),
            })
            .await?;
        }
        ("pods", []) => {
            for p in rt
                .list_pod_sandbox(cri::ListPodSandboxRequest::default())
                .await?
                .into_inner()
                .items
            {
                let m = p.metadata.unwrap_or_default();
                let ready = p.state == cri::PodSandboxState::SandboxReady as i32;
                println!(
                    "{}  {}/{}  {}",
                    &p.id[..13.min(p.id.len())],
                    m.namespace,
                    m.name,
                    if ready { "READY" } else { "NOTREADY" }
                );
            }
        }
        ("ps", []) => {
            for c in rt
                .list_containers(cri::ListContainersRequest::default())
                .await?
                .into_inner()
                .containers
            {
                let m = c.metadata.unwrap_or_default();
                println!(
                    "{}  {}  {}  pod {}",
                    &c.id[..13.min(c.id.len())],
                    m.name,
                    state_name(c.state),
                    &c.pod_sandbox_id[..13.min(c.pod_sandbox_id.len())]
                );
            }
        }
        ("inspectp", [id]) => {
            let s = rt
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: (*id).to_owned(),
                    verbose: false,
                })
                .await?
                .into_inner()
                .status
                .context("no status")?;
            let ready = s.state == cri::PodSandboxState::SandboxReady as i32;
            let ip = s.network.map(|n| n.ip).unwrap_or_default();
            println!(
                "{}  {}  ip {}",
                s.id,
                if ready { "READY" } else { "NOTREADY" },
                if ip.is_empty() { "(none)" } else { &ip }
            );
        }
        ("inspect", [id]) => {
            let s = rt
                .container_status(cri::ContainerStatusRequest {
                    container_id: (*id).to_owned(),
                    verbose: false,
                })
                .await?
                .into_inner()
                .status
                .context("no status")?;
            print!("{}  {}", s.id, state_name(s.state));
            if s.state == cri::ContainerState::ContainerExited as i32 {
                print!("  exit {} ({})", s.exit_code, s.reason);
            }
            println!("  log {}", s.log_path);
        }
        ("stopp", [id]) => {
            rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: (*id).to_owned(),
            })
            .await?;
        }
        ("rmp", [id]) => {
            rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: (*id).to_owned(),
            })
            .await?;
        }
        _ => bail!(USAGE),
    }
    Ok(0)
}
