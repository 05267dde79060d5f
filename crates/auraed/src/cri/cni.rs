//! Pod networks through CNI, as Kubernetes runtimes set them up: the first network
//! configuration in `--cni-conf-dir` (lexical order, `.conflist`, `.conf`, `.json`), its
//! plugins run from `--cni-bin-dir` for each sandbox (ADD in order, each given the one
//! before's result; DEL in reverse, each given the ADD's result), as the CNI spec says.
//!
//! A plugin runs as a child of auraed through the reaper (never `std::process`: the
//! reaper owns every wait), with the sandbox's network namespace open as its fd 3 and
//! named `/proc/self/fd/3`: opened once from the cell's init, so a pid reused meanwhile
//! cannot redirect it. The configuration used is kept in the sandbox's record, so a DEL
//! after a restart (or after the file changed) undoes exactly what the ADD did.

use std::{
    ffi::CString,
    io::{Read, Write},
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use aurae_sys::{Namespaces as Ns, SpawnRequest, spawn::Program};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// How long one plugin may take.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Most bytes of a plugin's output read.
const MAX_OUTPUT: u64 = 1 << 20;

/// Where CNI configurations and plugins are.
#[derive(Debug, Clone)]
pub struct CniConfig {
    pub conf_dir: PathBuf,
    pub bin_dirs: Vec<PathBuf>,
}

impl Default for CniConfig {
    fn default() -> Self {
        Self {
            conf_dir: PathBuf::from("/etc/cni/net.d"),
            bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
        }
    }
}

/// A network configuration list, as loaded (and kept in a sandbox's record).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NetConf {
    pub name: String,
    pub cni_version: String,
    /// Each plugin's configuration object, in order.
    pub plugins: Vec<Value>,
    /// The file it came from.
    pub file: PathBuf,
}

/// A sandbox's network once ADD succeeded: the configuration, the final result, its IPs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attached {
    pub conf: NetConf,
    pub result: Value,
    pub ips: Vec<String>,
}

/// What a plugin's run needs besides its configuration.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub container_id: &'a str,
    pub pod_name: &'a str,
    pub pod_namespace: &'a str,
    pub pod_uid: &'a str,
    /// `runtimeConfig.portMappings`, for plugins whose capabilities ask for them.
    pub port_mappings: Value,
}

/// Runs CNI plugins.
#[derive(Debug)]
pub struct Cni {
    cfg: CniConfig,
    reaper: Arc<crate::reaper::Reaper>,
}

fn version_ok(v: &str) -> bool {
    ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"].contains(&v)
}

/// Parses one configuration file: a `.conflist` or a single plugin's `.conf`.
pub fn parse(file: &Path, text: &str) -> Result<NetConf, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("{}: {e}", file.display()))?;
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let name = s("name")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| format!("{}: no \"name\"", file.display()))?;
    let cni_version = s("cniVersion").unwrap_or_else(|| "0.3.1".to_owned());
    if !version_ok(&cni_version) {
        return Err(format!(
            "{}: cniVersion {cni_version:?} is not one auraed speaks (0.3.0 to 1.1.0)",
            file.display()
        ));
    }
    let plugins = match v.get("plugins") {
        Some(Value::Array(p)) => p.clone(),
        Some(_) => return Err(format!("{}: \"plugins\" is not a list", file.display())),
        None if v.get("type").is_some() => vec![v.clone()],
        None => {
            return Err(format!(
                "{}: no \"plugins\" and no \"type\"",
                file.display()
            ));
        }
    };
    if plugins.is_empty() {
        return Err(format!("{}: \"plugins\" is empty", file.display()));
    }
    for (i, p) in plugins.iter().enumerate() {
        let t = p.get("type").and_then(Value::as_str).unwrap_or_default();
        if t.is_empty() || t.contains('/') || t.starts_with('.') {
            return Err(format!(
                "{}: plugins[{i}].type {t:?} is not a plugin name",
                file.display()
            ));
        }
    }
    Ok(NetConf {
        name,
        cni_version,
        plugins,
        file: file.to_owned(),
    })
}

/// The IPs of a CNI result (`ips[].address` without the prefix length; 0.3+ results).
pub fn ips_of(result: &Value) -> Vec<String> {
    result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address")?.as_str())
        .map(|a| a.split('/').next().unwrap_or(a).to_owned())
        .collect()
}

/// The configuration a plugin reads on stdin: its object with the list's name and
/// version, the result before it, and the runtime values its capabilities ask for.
pub fn plugin_input(conf: &NetConf, plugin: &Value, prev: Option<&Value>, t: &Target) -> Value {
    let mut p = plugin.clone();
    if let Some(o) = p.as_object_mut() {
        o.insert("name".into(), json!(conf.name));
        o.insert("cniVersion".into(), json!(conf.cni_version));
        if let Some(prev) = prev {
            o.insert("prevResult".into(), prev.clone());
        }
        let wants_ports = o
            .get("capabilities")
            .and_then(|c| c.get("portMappings"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if wants_ports && t.port_mappings.as_array().is_some_and(|a| !a.is_empty()) {
            o.insert(
                "runtimeConfig".into(),
                json!({ "portMappings": t.port_mappings }),
            );
        }
    }
    p
}

impl Cni {
    pub fn new(cfg: CniConfig, reaper: Arc<crate::reaper::Reaper>) -> Self {
        Self { cfg, reaper }
    }

    /// The network configuration to use now, and whether every plugin it names is
    /// installed. `Err`: why there is no usable one.
    pub fn config(&self) -> Result<NetConf, String> {
        let dir = &self.cfg.conf_dir;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| format!("CNI configuration directory {}: {e}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| x == "conflist" || x == "conf" || x == "json")
            })
            .collect();
        files.sort();
        let first = files
            .first()
            .ok_or_else(|| format!("no CNI network configuration in {}", dir.display()))?;
        let text =
            std::fs::read_to_string(first).map_err(|e| format!("{}: {e}", first.display()))?;
        let conf = parse(first, &text)?;
        for p in &conf.plugins {
            let t = p["type"].as_str().unwrap_or_default();
            self.plugin(t)?;
        }
        Ok(conf)
    }

    /// The plugin binary `name` in the first bin dir that has it.
    fn plugin(&self, name: &str) -> Result<PathBuf, String> {
        self.cfg
            .bin_dirs
            .iter()
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                format!(
                    "CNI plugin {name:?} is not in {}",
                    self.cfg
                        .bin_dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    /// ADD of every plugin, in order. On a failure the plugins already added are deleted
    /// (best effort, reported in the error).
    pub async fn add(
        &self,
        conf: NetConf,
        netns: OwnedFd,
        t: &Target<'_>,
    ) -> Result<Attached, String> {
        let netns = Arc::new(netns);
        let mut prev: Option<Value> = None;
        for (i, plugin) in conf.plugins.iter().enumerate() {
            let input = plugin_input(&conf, plugin, prev.as_ref(), t);
            match self.run("ADD", &input, Some(netns.clone()), t).await {
                Ok(out) => prev = Some(out),
                Err(e) => {
                    let undo = NetConf {
                        plugins: conf.plugins[..=i].to_vec(),
                        ..conf.clone()
                    };
                    let undone = match self.del(&undo, prev.as_ref(), Some(netns.clone()), t).await
                    {
                        Ok(()) => String::new(),
                        Err(d) => format!("; undoing it: {d}"),
                    };
                    return Err(format!("{e}{undone}"));
                }
            }
        }
        let result = prev.unwrap_or(Value::Null);
        Ok(Attached {
            ips: ips_of(&result),
            conf,
            result,
        })
    }

    /// DEL of every plugin, in reverse order; all are tried, the failures reported.
    pub async fn del(
        &self,
        conf: &NetConf,
        result: Option<&Value>,
        netns: Option<Arc<OwnedFd>>,
        t: &Target<'_>,
    ) -> Result<(), String> {
        let mut errors = Vec::new();
        for plugin in conf.plugins.iter().rev() {
            let input = plugin_input(conf, plugin, result, t);
            if let Err(e) = self.run("DEL", &input, netns.clone(), t).await {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// One plugin run: its output (the result) or why it failed.
    async fn run(
        &self,
        command: &str,
        input: &Value,
        netns: Option<Arc<OwnedFd>>,
        t: &Target<'_>,
    ) -> Result<Value, String> {
        let ty = input["type"].as_str().unwrap_or_default().to_owned();
        let bin = self.plugin(&ty)?;
        let path = self
            .cfg
            .bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let mut env = vec![
            format!("CNI_COMMAND={command}"),
            format!("CNI_CONTAINERID={}", t.container_id),
            format!(
                "CNI_NETNS={}",
                if netns.is_some() {
                    "/proc/self/fd/3"
                } else {
                    ""
                }
            ),
            "CNI_IFNAME=eth0".to_owned(),
            format!("CNI_PATH={path}"),
            format!(
                "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                t.pod_namespace, t.pod_name, t.container_id, t.pod_uid
            ),
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        ];
        env.retain(|e| !e.contains('\0'));
        let stdin = serde_json::to_vec(input).map_err(|e| e.to_string())?;
        let reaper = self.reaper.clone();
        let what = format!("CNI plugin {ty} {command}");
        let (child, io) = tokio::task::spawn_blocking(move || {
            start(&reaper, &bin, &env, stdin, netns.as_deref())
        })
        .await
        .map_err(|e| format!("{what}: {e}"))?
        .map_err(|e| format!("{what}: {e}"))?;
        let pidfd = child.pidfd.clone();
        let mut exit = child.exit;
        let status = match tokio::time::timeout(PLUGIN_TIMEOUT, &mut exit).await {
            Ok(s) => s,
            Err(_) => {
                let _ = pidfd.send_signal(nix::libc::SIGKILL);
                let _ = exit.await;
                return Err(format!(
                    "{what} did not finish within {} s: killed",
                    PLUGIN_TIMEOUT.as_secs()
                ));
            }
        }
        .map_err(|_| format!("{what}: its exit status was lost"))?;
        // Its output ends with it, unless a process it left behind holds the pipes.
        let (out, err) = tokio::time::timeout(Duration::from_secs(5), io)
            .await
            .map_err(|_| format!("{what}: its output did not end 5 s after it exited"))?
            .map_err(|e| format!("{what}: {e}"))?;
        let code = match status {
            aurae_sys::ExitStatus::Code(c) => c,
            aurae_sys::ExitStatus::Signal(sig) => 128 + sig,
        };
        let parsed: Option<Value> = serde_json::from_slice(&out).ok();
        if code != 0 {
            let msg = parsed
                .as_ref()
                .and_then(|v| {
                    let m = v.get("msg")?.as_str()?;
                    let d = v.get("details").and_then(Value::as_str).unwrap_or("");
                    Some(if d.is_empty() {
                        m.to_owned()
                    } else {
                        format!("{m}: {d}")
                    })
                })
                .unwrap_or_else(|| String::from_utf8_lossy(&err).trim().to_owned());
            return Err(format!("{what} failed (exit {code}): {msg}"));
        }
        if command == "DEL" {
            return Ok(Value::Null);
        }
        parsed.ok_or_else(|| format!("{what}: its output is not a JSON result"))
    }
}

/// Spawns `bin` through the reaper with the netns as its fd 3; the child, and a task
/// that writes `stdin` to it and reads its stdout and stderr (each bounded) to their end.
#[allow(clippy::type_complexity)]
fn start(
    reaper: &crate::reaper::Reaper,
    bin: &Path,
    env: &[String],
    stdin: Vec<u8>,
    netns: Option<&OwnedFd>,
) -> Result<
    (
        crate::reaper::Child,
        tokio::task::JoinHandle<(Vec<u8>, Vec<u8>)>,
    ),
    String,
> {
    use nix::{fcntl::OFlag, unistd::pipe2};
    let pipe = || pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"));
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let program = CString::new(bin.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    let argv = [program.clone()];
    let envp: Vec<CString> = env
        .iter()
        .filter_map(|e| CString::new(e.as_str()).ok())
        .collect();
    let req = SpawnRequest {
        program: Program::Path(&program),
        argv: &argv,
        envp: &envp,
        cwd: Some(c"/"),
        uid: None,
        gid: None,
        no_new_privs: false,
        stdio: [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()],
        controlling_terminal: false,
        pass_fd: netns.map(AsRawFd::as_raw_fd),
        cgroup: None,
        new_namespaces: Ns(0),
        pid_namespace_of: None,
        join: None,
        unshare: Ns(0),
        container: None,
        console: None,
    };
    let child = reaper
        .spawn(|| aurae_sys::spawn(&req))
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    drop((in_r, out_w, err_w));
    let io = tokio::task::spawn_blocking(move || {
        let writer = std::thread::spawn(move || {
            // A plugin that exits without reading gets EPIPE here: nothing to report.
            let _ = std::fs::File::from(in_w).write_all(&stdin);
        });
        let err_reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = std::fs::File::from(err_r)
                .take(MAX_OUTPUT)
                .read_to_end(&mut buf);
            buf
        });
        let mut out = Vec::new();
        let _ = std::fs::File::from(out_r)
            .take(MAX_OUTPUT)
            .read_to_end(&mut out);
        let _ = writer.join();
        (out, err_reader.join().unwrap_or_default())
    });
    Ok((child, io))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_are_lists_or_single_plugins_and_checked() {
        let f = Path::new("/x/10-net.conflist");
        let c = parse(
            f,
            r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#,
        )
        .unwrap();
        assert_eq!((c.name.as_str(), c.plugins.len()), ("k8s", 2));
        let single = parse(f, r#"{"cniVersion":"0.4.0","name":"n","type":"bridge"}"#).unwrap();
        assert_eq!(single.plugins[0]["type"], "bridge");
        for bad in [
            r#"{"cniVersion":"1.0.0","plugins":[{"type":"bridge"}]}"#,
            r#"{"cniVersion":"9.9.9","name":"n","type":"bridge"}"#,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../../bin/sh"}]}"#,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#,
            r#"{"name":"n"}"#,
            "not json",
        ] {
            assert!(parse(f, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plugins_get_the_name_version_previous_result_and_ports_they_ask_for() {
        let c = parse(
            Path::new("/x/a.conflist"),
            r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#,
        )
        .unwrap();
        let t = Target {
            container_id: "abc",
            pod_name: "p",
            pod_namespace: "default",
            pod_uid: "u",
            port_mappings: json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]),
        };
        let first = plugin_input(&c, &c.plugins[0], None, &t);
        assert_eq!(first["name"], "k8s");
        assert_eq!(first["cniVersion"], "1.0.0");
        assert!(first.get("prevResult").is_none() && first.get("runtimeConfig").is_none());
        let prev = json!({"ips": [{"address": "10.88.0.5/16"}, {"address": "fd00::5/64"}]});
        let second = plugin_input(&c, &c.plugins[1], Some(&prev), &t);
        assert_eq!(second["prevResult"], prev);
        assert_eq!(second["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
        assert_eq!(ips_of(&prev), ["10.88.0.5", "fd00::5"]);
        assert!(ips_of(&json!({})).is_empty());
    }
}
