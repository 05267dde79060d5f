//! Containers (host tier: root, cgroup v2, a loopback registry, busybox-static): images the
//! tests build and push run through RunCell and RunExecutable. A probe checks the
//! container from inside (capabilities, no_new_privs, seccomp, fds, masked and read-only
//! paths, PID and network namespaces, device nodes: no mknod, a nodev `/dev` with the
//! host's nodes read-only); runc's CVE classes are replayed (a `/proc/self/fd`
//! working directory, a symlinked `/proc` or `/dev/null` in the image, writes to the
//! runtime's binary); sidecars share localhost; volumes only from allowed roots; bad input
//! fails precisely and leaves nothing (no cell, no container directory).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{collections::BTreeMap, path::Path};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    Daemon, DaemonOptions, oci,
    registry::{LocalRegistry, for_containers},
    workload,
};
use tonic::Code;

struct Env {
    _registry: LocalRegistry,
    host: String,
    d: Daemon,
    c: Client,
    /// The busybox image's reference and manifest digest.
    image: String,
    digest: String,
}

async fn env(test: &str, extra: &[&str]) -> Option<Env> {
    env_with(test, extra, None).await
}

async fn env_with(test: &str, extra: &[&str], policy: Option<String>) -> Option<Env> {
    let registry = for_containers(test).unwrap()?;
    let host = registry.host();
    let digest = oci::push_busybox(
        &host,
        "aurae/busybox",
        serde_json::json!({"Cmd": ["sh"], "Env": ["PATH=/bin", "FROM_IMAGE=1"]}),
    )
    .unwrap();
    let mut args = vec!["--insecure-registry".to_owned(), host.clone()];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            extra_args: args,
            policy,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let c = d.client("admin").await.unwrap();
    Some(Env {
        image: format!("{host}/aurae/busybox:v1"),
        _registry: registry,
        host,
        d,
        c,
        digest,
    })
}

impl Env {
    fn containers_left(&self) -> usize {
        std::fs::read_dir(self.d.dir.path().join("state/containers"))
            .map(|r| r.count())
            .unwrap_or(0)
    }

    /// Whether what freed containers left in `containers-removed` is deleted within 10 s.
    async fn removed_drained(&self) -> bool {
        let removed = self.d.dir.path().join("state/containers-removed");
        for _ in 0..1000 {
            if std::fs::read_dir(&removed).is_ok_and(|mut r| r.next().is_none()) {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        false
    }

    fn container(&self, script: &str) -> pb::Container {
        pb::Container {
            image: self.image.clone(),
            entrypoint: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        }
    }

    /// RunCell, wait for the container, return its status and output; frees the cell.
    async fn run_cell(
        &self,
        cell: &str,
        container: pb::Container,
    ) -> Result<(pb::ExecutableStatus, String), tonic::Status> {
        let container_image = container.image.clone();
        let st = self
            .c
            .runtime()
            .run_cell(pb::Cell {
                name: cell.into(),
                container: Some(container.clone()),
                ..Default::default()
            })
            .await?
            .into_inner();
        assert_eq!(st.executables.len(), 1, "{st:?}");
        let name = st.executables[0].name.clone();
        if container_image == self.image {
            assert_eq!(st.image_digest, self.digest);
        }
        let exit = workload::wait(&self.c, cell, &name).await?;
        let out = workload::output(&self.c, cell, &name).await?;
        self.c
            .cells()
            .free(pb::NameRef { name: cell.into() })
            .await?;
        Ok((exit, out))
    }
}

fn code(st: &pb::ExecutableStatus) -> Option<i32> {
    match st.exit.as_ref()?.how? {
        pb::exit_status::How::Code(c) => Some(c),
        pb::exit_status::How::Signal(_) => None,
    }
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
}

// stderr is closed for the whole probe: the shell reports a failed redirection before any
// `2>/dev/null` on the same command applies, and stderr lines would interleave with the
// stdout lines the test parses.
const PROBE: &str = r#"
exec 2>/dev/null
grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status
echo fds-begin
ls /proc/$$/fd
echo fds-end
echo "timer_list: $(wc -c < /proc/timer_list)"
echo "keys: $(wc -c < /proc/keys)"
echo "firmware: $(ls -A /sys/firmware | wc -l)"
if echo x > /proc/sys/kernel/hostname 2>/dev/null; then echo "procsys: writable"; else echo "procsys: readonly"; fi
if echo 1 > /proc/sysrq-trigger 2>/dev/null; then echo "sysrq: writable"; else echo "sysrq: blocked"; fi
echo "pids: $(ls /proc | grep -cE '^[0-9]+$')"
echo "pid1: $(cat /proc/1/comm)"
echo "netdevs: $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')"
if ls /proc/1/root/ >/dev/null 2>&1; then echo "init-root: readable"; else echo "init-root: denied"; fi
if echo x >> /proc/1/exe 2>/dev/null; then echo "init-exe: written"; else echo "init-exe: refused"; fi
if mount -t tmpfs none /tmp 2>/dev/null; then echo "mount: allowed"; else echo "mount: denied"; fi
if unshare -n true 2>/dev/null; then echo "unshare: allowed"; else echo "unshare: denied"; fi
echo "devnull: $(stat -c %F /dev/null)"
echo "mknod-dev: $(mknod /dev/x b 7 0 2>&1 && echo made)"
echo "mknod-tmp: $(mknod /tmp/x c 1 3 2>&1 && echo made)"
echo "dev-opts: $(awk '$5 == "/dev" {print $6}' /proc/self/mountinfo)"
echo "devnull-opts: $(awk '$5 == "/dev/null" {print $6}' /proc/self/mountinfo)"
echo "root-fs: $(awk '$5 == "/" {print $(NF-2), $NF}' /proc/self/mountinfo)"
if echo hi > /dev/null; then echo "devnull-write: ok"; else echo "devnull-write: failed"; fi
echo "zero: $(head -c 5 /dev/zero | wc -c) urandom: $(head -c 5 /dev/urandom | wc -c)"
if chmod 666 /dev/null; then echo "devnull-chmod: allowed"; else echo "devnull-chmod: refused"; fi
echo "devs: $(ls /dev | tr '\n' ' ')"
echo "user: $(id -u):$(id -g)"
echo "env: $FROM_IMAGE"
echo "root-image: $(grep -c '^app:' /etc/passwd)"
echo "cwd: $(pwd)"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_from_inside_a_container() {
    let Some(e) = env("probe_from_inside_a_container", &[]).await else {
        return;
    };
    let (st, out) = e.run_cell("probe", e.container(PROBE)).await.unwrap();
    assert_eq!(code(&st), Some(0), "{out}");
    println!("{out}");
    // Docker's 14 default capabilities less CAP_MKNOD in the bounding, permitted and
    // effective sets; inheritable and ambient empty.
    let default = format!("{:016x}", auraed::container::DEFAULT_CAPABILITIES);
    assert_eq!(default, "00000000a00425fb", "no CAP_MKNOD (bit 27)");
    assert_eq!(field(&out, "CapInh"), "0000000000000000");
    assert_eq!(field(&out, "CapAmb"), "0000000000000000");
    assert_eq!(field(&out, "CapBnd"), default);
    assert_eq!(field(&out, "CapEff"), default);
    assert_eq!(field(&out, "NoNewPrivs"), "1");
    assert_eq!(field(&out, "Seccomp"), "2");
    // Only stdio crosses the exec.
    let fds: Vec<&str> = out
        .lines()
        .skip_while(|l| *l != "fds-begin")
        .skip(1)
        .take_while(|l| *l != "fds-end")
        .collect();
    assert_eq!(fds, ["0", "1", "2"], "{out}");
    // The host's is thousands of bytes.
    assert_eq!(field(&out, "timer_list"), "0", "masked with /dev/null");
    assert_eq!(field(&out, "keys"), "0");
    assert_eq!(field(&out, "firmware"), "0", "masked with an empty tmpfs");
    assert_eq!(field(&out, "procsys"), "readonly");
    assert_eq!(field(&out, "sysrq"), "blocked");
    // Own PID namespace: the cell init, the shell and its pipeline, not the host's.
    let pids: usize = field(&out, "pids").parse().unwrap();
    assert!(pids < 8, "{pids} pids visible");
    assert_eq!(field(&out, "pid1"), "aurae-init");
    assert_eq!(field(&out, "netdevs"), "lo", "own network namespace");
    assert_eq!(field(&out, "init-root"), "denied");
    assert_eq!(field(&out, "init-exe"), "refused");
    assert_eq!(field(&out, "mount"), "denied");
    assert_eq!(field(&out, "unshare"), "denied");
    assert_eq!(field(&out, "devnull"), "character special file");
    // No device node can be made (no CAP_MKNOD), not even an allowed one, and none would
    // open: /dev is nodev. The six nodes are the host's, bind-mounted read-only (their
    // owner and mode cannot be changed from inside), and they work.
    assert_eq!(
        field(&out, "mknod-dev"),
        "mknod: /dev/x: Operation not permitted"
    );
    assert_eq!(
        field(&out, "mknod-tmp"),
        "mknod: /tmp/x: Operation not permitted"
    );
    let opts = |k| field(&out, k).split(',').collect::<Vec<_>>();
    assert!(
        opts("dev-opts").contains(&"nodev") && opts("dev-opts").contains(&"nosuid"),
        "{out}"
    );
    assert!(
        opts("devnull-opts").contains(&"ro") && opts("devnull-opts").contains(&"nosuid"),
        "{out}"
    );
    // The root is the image's overlay, `volatile` where the kernel has it (5.10 on): its
    // unmount at the container's end syncs nothing of the host's file system.
    let (fs, super_opts) = field(&out, "root-fs").split_once(' ').unwrap_or_default();
    assert_eq!(fs, "overlay", "{out}");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut v = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let new_enough = (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (5, 10);
    assert_eq!(
        // (Shown as `fsync=volatile` by newer kernels.)
        super_opts
            .split(',')
            .any(|o| o == "volatile" || o == "fsync=volatile"),
        new_enough,
        "kernel {release}: {out}"
    );
    assert_eq!(field(&out, "devnull-write"), "ok");
    assert_eq!(field(&out, "zero"), "5 urandom: 5");
    assert_eq!(field(&out, "devnull-chmod"), "refused");
    for dev in [
        "null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "fd",
    ] {
        assert!(
            field(&out, "devs").split(' ').any(|d| d == dev),
            "/dev/{dev}: {out}"
        );
    }
    assert_eq!(field(&out, "user"), "0:0");
    assert_eq!(field(&out, "env"), "1");
    assert_eq!(field(&out, "root-image"), "1");
    assert_eq!(field(&out, "cwd"), "/");
    assert_eq!(
        e.containers_left(),
        0,
        "the container's directories are removed"
    );
    // Pseudo-terminal exhaustion: 300 processes each holding a new terminal of the
    // container's devpts get at most 64 (its own instance's `max`), the rest ENOSPC;
    // the host's devpts is not where they come from.
    let host_ptys = std::fs::read_dir("/dev/pts").map_or(0, |d| d.count());
    let (st, out) = e
        .run_cell(
            "ptys",
            e.container(
                "for i in $(seq 300); do sleep 20 </dev/ptmx 2>/dev/null & done; sleep 2; \
                 echo held: $(ls /dev/pts | grep -c '^[0-9]'); kill $(jobs -p) 2>/dev/null; true",
            ),
        )
        .await
        .unwrap();
    assert_eq!(code(&st), Some(0), "{out}");
    let held: usize = field(&out, "held").parse().unwrap();
    println!("a container opening 300 terminals holds {held}");
    assert_eq!(held, 64, "{out}");
    let host_now = std::fs::read_dir("/dev/pts").map_or(0, |d| d.count());
    assert!(
        host_now <= host_ptys + 2,
        "the host's devpts grew: {host_ptys} -> {host_now}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runc_cve_classes_are_refused() {
    let Some(e) = env("runc_cve_classes_are_refused", &[]).await else {
        return;
    };
    let passwd_before = std::fs::read("/etc/passwd").unwrap();
    let auraed = std::fs::read(env!("CARGO_BIN_EXE_auraed")).unwrap();
    // CVE-2024-21626: a working directory through a leaked fd. Every fd number a child
    // could hold is tried; none may start.
    for fd in 3..16 {
        let mut c = e.container("pwd; ls ..");
        c.working_dir = format!("/proc/self/fd/{fd}");
        let err = e.run_cell("cwd", c).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "fd {fd}: {err:?}");
        assert!(
            err.message().contains("working directory"),
            "{}",
            err.message()
        );
    }
    // CVE-2019-19921 class: /proc in the image is a symlink (to the host's /etc, were it
    // followed before the pivot).
    let layer = oci::LayerBuilder::new()
        .symlink("proc", "/etc")
        .unwrap()
        .file("bin/sh", b"", 0o755)
        .unwrap()
        .finish()
        .unwrap();
    oci::push_image(
        &e.host,
        "aurae/evil-proc",
        "v1",
        &[layer],
        serde_json::json!({"Cmd": ["/bin/sh"]}),
    )
    .unwrap();
    let err = e
        .run_cell(
            "evil-proc",
            pb::Container {
                image: format!("{}/aurae/evil-proc:v1", e.host),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("/proc"), "{}", err.message());
    // /dev/null a symlink to the host's /etc/passwd: /dev is a fresh tmpfs, so writing
    // to /dev/null writes nowhere.
    let base = oci::busybox_rootfs().unwrap();
    let layer = base
        .symlink("dev/null", "/etc/passwd")
        .unwrap()
        .finish()
        .unwrap();
    oci::push_image(
        &e.host,
        "aurae/evil-null",
        "v1",
        &[layer],
        serde_json::json!({"Cmd": ["sh"]}),
    )
    .unwrap();
    let (st, out) = e
        .run_cell(
            "evil-null",
            pb::Container {
                image: format!("{}/aurae/evil-null:v1", e.host),
                entrypoint: vec![
                    "sh".into(),
                    "-c".into(),
                    "echo pwned > /dev/null; stat -c %F /dev/null".into(),
                ],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(code(&st), Some(0), "{out}");
    assert_eq!(out.trim(), "character special file");
    // CVE-2019-5736 class: the runtime's binary. The cell init (pid 1 in the container)
    // runs from a sealed copy; its /proc entries are closed to the container.
    let (st, out) = e
        .run_cell(
            "exe",
            e.container(
                "for f in /proc/1/exe /proc/1/root/proc/self/exe; do if echo x >> $f; then echo wrote $f; fi; done 2>/dev/null; \
                 echo x > /bin/busybox.new && mv /bin/busybox.new /bin/sh; echo done",
            ),
        )
        .await
        .unwrap();
    assert_eq!(code(&st), Some(0), "{out}");
    assert!(!out.contains("wrote"), "{out}");
    // A container's writes stay in its upper directory: the next one sees the image.
    let (_, out) = e
        .run_cell("after", e.container("ls -l /bin/sh | grep -c busybox"))
        .await
        .unwrap();
    assert_eq!(out.trim(), "1", "the shared layer was not modified");
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd_before);
    assert_eq!(std::fs::read(env!("CARGO_BIN_EXE_auraed")).unwrap(), auraed);
    assert_eq!(e.containers_left(), 0);
    // Their upper layers (one with the files written above) deleted after the frees.
    assert!(e.removed_drained().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_share_localhost_and_volumes_come_only_from_allowed_roots() {
    let vols = tempfile::tempdir().unwrap();
    let root = vols.path().join("allowed");
    std::fs::create_dir_all(root.join("data")).unwrap();
    std::fs::create_dir_all(root.join("ro")).unwrap();
    std::fs::write(root.join("ro/seed"), "seed").unwrap();
    let root_arg = root.to_string_lossy().into_owned();
    let Some(e) = env(
        "sidecars_share_localhost_and_volumes_come_only_from_allowed_roots",
        &["--volume-root", &root_arg],
    )
    .await
    else {
        return;
    };
    let c = &e.c;
    c.cells()
        .allocate(pb::Cell {
            name: "pod".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // A server container and two clients: a plain executable (host binary) and a second
    // container, all in one cell.
    c.runtime()
        .run_executable(pb::Executable {
            cell: "pod".into(),
            name: "server".into(),
            container: Some(e.container("nc -ll -p 9000 -e echo hello-from-container")),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut plain = None;
    for i in 0..50 {
        let (st, out) = workload::run_to_end(
            c,
            pb::Executable {
                cell: "pod".into(),
                name: format!("plain-{i}"),
                argv: vec![
                    "/bin/busybox".into(),
                    "nc".into(),
                    "127.0.0.1".into(),
                    "9000".into(),
                ],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        if out.contains("hello-from-container") {
            plain = Some(st);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        plain.is_some(),
        "a plain executable reached the container over localhost"
    );
    let (st, out) = workload::run_to_end(
        c,
        pb::Executable {
            cell: "pod".into(),
            name: "client".into(),
            container: Some(e.container("nc 127.0.0.1 9000")),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(code(&st), Some(0), "{out}");
    assert!(out.contains("hello-from-container"), "{out}");
    assert_eq!(st.image_digest, e.digest);
    // Volumes: read-write and read-only, from under the allowed root.
    let mut v = e.container("echo written > /data/out; cat /ro/seed; if echo x > /ro/seed; then echo ro-writable; fi 2>/dev/null; true");
    v.volumes = vec![
        pb::Volume {
            host_path: root.join("data").to_string_lossy().into(),
            container_path: "/data".into(),
            read_only: false,
        },
        pb::Volume {
            host_path: root.join("ro").to_string_lossy().into(),
            container_path: "/ro".into(),
            read_only: true,
        },
    ];
    let (st, out) = workload::run_to_end(
        c,
        pb::Executable {
            cell: "pod".into(),
            name: "volumes".into(),
            container: Some(v.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(code(&st), Some(0), "{out}");
    assert!(
        out.contains("seed") && !out.contains("ro-writable"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("data/out")).unwrap(),
        "written\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("ro/seed")).unwrap(),
        "seed"
    );
    // Outside the allowed root (also through a symlink or ..): refused before anything runs.
    std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
    for (i, host) in [
        "/etc".to_owned(),
        root.join("link").to_string_lossy().into(),
        format!("{root_arg}/../"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut bad = v.clone();
        bad.volumes.truncate(1);
        bad.volumes[0].host_path = host.clone();
        let err = c
            .runtime()
            .run_executable(pb::Executable {
                cell: "pod".into(),
                name: format!("bad-{i}"),
                container: Some(bad),
                ..Default::default()
            })
            .await
            .unwrap_err();
        // A '..' is refused as a malformed path; the others as outside the root.
        let want = if i == 2 {
            Code::InvalidArgument
        } else {
            Code::FailedPrecondition
        };
        assert_eq!(err.code(), want, "{host}: {err:?}");
    }
    let mut bad = v.clone();
    bad.volumes.truncate(1);
    bad.volumes[0].container_path = "/proc/sys".into();
    let err = c
        .runtime()
        .run_executable(pb::Executable {
            cell: "pod".into(),
            name: "bad-target".into(),
            container: Some(bad),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("container.volumes[0].container_path"),
        "{}",
        err.message()
    );
    // Removing the image while its containers exist frees its blobs but not the layers
    // they run on.
    let freed = c
        .images()
        .remove(pb::RemoveImageRequest {
            image: e.image.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(freed.freed_layers, 0, "layers in use are kept");
    assert!(freed.freed_blobs > 0);
    let layers = e.d.dir.path().join("state/images/layers/sha256");
    assert_eq!(std::fs::read_dir(&layers).unwrap().count(), 1);
    c.cells()
        .free(pb::NameRef { name: "pod".into() })
        .await
        .unwrap();
    assert_eq!(e.containers_left(), 0);
}

/// Files as volumes (kubelet mounts a pod's /etc/hosts and a termination log in /dev) and
/// DNS settings as the container's /etc/resolv.conf; what must stay refused is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_volumes_and_dns_settings() {
    let vols = tempfile::tempdir().unwrap();
    let root = vols.path().join("allowed");
    std::fs::create_dir_all(root.join("dir")).unwrap();
    std::fs::write(root.join("hosts"), "10.0.0.7 db\n").unwrap();
    std::fs::write(root.join("term"), "").unwrap();
    let root_arg = root.to_string_lossy().into_owned();
    let Some(e) = env(
        "file_volumes_and_dns_settings",
        &["--volume-root", &root_arg],
    )
    .await
    else {
        return;
    };
    let file = |host: &str, target: &str, read_only: bool| pb::Volume {
        host_path: root.join(host).to_string_lossy().into(),
        container_path: target.into(),
        read_only,
    };
    // On a read-only root: the targets are made before the root turns read-only.
    let mut c = e.container(
        "cat /etc/hosts /etc/resolv.conf; echo done > /dev/termination-log; \
         if echo x >> /etc/hosts; then echo hosts-writable; fi 2>/dev/null; \
         if echo x >> /etc/resolv.conf; then echo resolv-writable; fi 2>/dev/null; \
         stat -c %F /etc/hosts /dev/termination-log /dev/null; ls /new/dir/f",
    );
    c.read_only_root = true;
    c.volumes = vec![
        file("hosts", "/etc/hosts", true),
        file("term", "/dev/termination-log", false),
        file("hosts", "/new/dir/f", true),
    ];
    c.dns = Some(pb::ContainerDns {
        servers: vec!["10.96.0.10".into(), "fd00::a".into()],
        searches: vec!["ns.svc.cluster.local".into()],
        options: vec!["ndots:5".into(), "edns0".into()],
    });
    let (st, out) = e.run_cell("files", c.clone()).await.unwrap();
    assert_eq!(code(&st), Some(0), "{out}");
    assert!(out.contains("10.0.0.7 db"), "{out}");
    assert!(
        out.contains(
            "nameserver 10.96.0.10\nnameserver fd00::a\nsearch ns.svc.cluster.local\noptions ndots:5 edns0\n"
        ),
        "{out}"
    );
    assert!(!out.contains("writable"), "{out}");
    assert!(
        out.contains("regular file\nregular file\ncharacter special file\n/new/dir/f"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("term")).unwrap(),
        "done\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("hosts")).unwrap(),
        "10.0.0.7 db\n"
    );
    assert_eq!(
        e.containers_left(),
        0,
        "the resolv.conf went with the container"
    );
    // Refused before anything runs, naming the field.
    std::os::unix::fs::symlink(root.join("hosts"), root.join("link")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let refused = [
        (
            vec![file("dir", "/dev/data", false)],
            "container.volumes[0].container_path",
        ),
        (
            vec![file("hosts", "/dev/null", false)],
            "container.volumes[0].container_path",
        ),
        (
            vec![file("hosts", "/dev/pts/9", false)],
            "container.volumes[0].container_path",
        ),
        (
            vec![file("hosts", "/dev/shm/x", false)],
            "container.volumes[0].container_path",
        ),
        (
            vec![file("hosts", "/sys/x", false)],
            "container.volumes[0].container_path",
        ),
        (
            vec![file("fifo", "/etc/f", false)],
            "container.volumes[0].host_path",
        ),
        (
            vec![file("link", "/etc/f", false)],
            "container.volumes[0].host_path",
        ),
    ];
    for (i, (volumes, field)) in refused.into_iter().enumerate() {
        let mut bad = e.container("true");
        bad.volumes = volumes;
        let err = e.run_cell(&format!("bad-{i}"), bad).await.unwrap_err();
        assert!(
            matches!(err.code(), Code::InvalidArgument | Code::FailedPrecondition),
            "{i}: {err:?}"
        );
        assert!(err.message().contains(field), "{i}: {}", err.message());
    }
    for (dns, field) in [
        (
            pb::ContainerDns {
                servers: vec!["10.0.0.1\nnameserver 6.6.6.6".into()],
                ..Default::default()
            },
            "container.dns.servers[0]",
        ),
        (
            pb::ContainerDns {
                searches: vec!["a b".into()],
                ..Default::default()
            },
            "container.dns.searches[0]",
        ),
        (
            pb::ContainerDns {
                options: vec!["".into()],
                ..Default::default()
            },
            "container.dns.options[0]",
        ),
    ] {
        let mut bad = e.container("true");
        bad.dns = Some(dns);
        let err = e.run_cell("bad-dns", bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(field), "{}", err.message());
    }
    // A file onto a directory of the image: the container does not start, and says which.
    let mut bad = e.container("true");
    bad.volumes = vec![file("hosts", "/etc", true)];
    let err = e.run_cell("onto-dir", bad).await.unwrap_err();
    assert!(err.message().contains("attach volume"), "{err:?}");
    assert_eq!(e.containers_left(), 0);
    let cells =
        e.c.cells()
            .list(pb::ListRequest::default())
            .await
            .unwrap()
            .into_inner();
    assert!(cells.cells.is_empty(), "{cells:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_user_read_only_root_and_bad_input() {
    let Some(e) = env("image_user_read_only_root_and_bad_input", &[]).await else {
        return;
    };
    // The image's user by name, a read-only root (writable /tmp would need a volume).
    oci::push_busybox(&e.host, "aurae/app", serde_json::json!({"Entrypoint": ["sh", "-c"], "Cmd": ["id -u; id -g; grep CapEff /proc/self/status; touch /x || echo ro"], "User": "app", "WorkingDir": "/tmp"})).unwrap();
    let (st, out) = e
        .run_cell(
            "app",
            pb::Container {
                image: format!("{}/aurae/app:v1", e.host),
                read_only_root: true,
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|err| panic!("{err:?}"));
    assert_eq!(code(&st), Some(0), "{out}");
    // stdout and stderr interleave: look for lines, not positions.
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(
        lines.iter().filter(|l| **l == "1000").count(),
        2,
        "uid and gid 1000: {out}"
    );
    assert!(
        lines.contains(&"CapEff:\t0000000000000000") || out.contains("CapEff:\t0000000000000000"),
        "no capabilities for a non-root user: {out}"
    );
    assert!(out.contains("Read-only file system"), "{out}");
    assert!(out.contains("ro"), "{out}");
    // A read-only root's upper layer is in memory, in the container's own mount
    // namespace: the working directory it had to make is there, the root stays read-only,
    // and nothing is written on the host (its directory there is an empty mount point, no
    // mount under it in the host's namespace); freed, nothing is left.
    let mut ro = e.container(
        "pwd; grep -c ' / / .*upperdir=/[^,]*/u,workdir=/[^,]*/w' /proc/self/mountinfo; touch /srv/app/f || echo ro-ok; sleep 60",
    );
    ro.read_only_root = true;
    ro.working_dir = "/srv/app".into();
    let st =
        e.c.runtime()
            .run_cell(pb::Cell {
                name: "ro-mem".into(),
                container: Some(ro),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    let exe = st.executables[0].name.clone();
    let mut out = String::new();
    for _ in 0..100 {
        out = workload::logs(&e.c, "ro-mem", &exe, false).await.unwrap();
        if out.contains("ro-ok") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert!(lines.contains(&"/srv/app"), "{out}");
    assert!(
        lines.contains(&"1"),
        "the root's upper layer in memory: {out}"
    );
    assert!(
        out.contains("Read-only file system") && lines.contains(&"ro-ok"),
        "{out}"
    );
    let dirs: Vec<std::path::PathBuf> = std::fs::read_dir(e.d.dir.path().join("state/containers"))
        .unwrap()
        .map(|d| d.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let on_host: Vec<_> = std::fs::read_dir(&dirs[0]).unwrap().collect();
    assert!(on_host.is_empty(), "{on_host:?}");
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !host_mounts.contains(&dirs[0].to_string_lossy().into_owned()),
        "{host_mounts}"
    );
    e.c.cells()
        .free(pb::NameRef {
            name: "ro-mem".into(),
        })
        .await
        .unwrap();
    assert_eq!(e.containers_left(), 0);
    // Bad input: each a precise error, no cell left, no container directory left.
    let cases: Vec<(&str, pb::Container, Code, &str)> = vec![
        (
            "unknown image",
            pb::Container {
                image: format!("{}/aurae/none:v1", e.host),
                ..Default::default()
            },
            Code::NotFound,
            "aurae/none",
        ),
        (
            "malformed reference",
            pb::Container {
                image: "UPPER/Case".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "container.image",
        ),
        (
            "missing program",
            pb::Container {
                image: e.image.clone(),
                entrypoint: vec!["/no/such/program".into()],
                ..Default::default()
            },
            Code::InvalidArgument,
            "argv[0]",
        ),
        (
            "climbing working dir",
            pb::Container {
                image: e.image.clone(),
                working_dir: "/a/../../b".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "working_dir",
        ),
        (
            "volume without roots",
            pb::Container {
                image: e.image.clone(),
                volumes: vec![pb::Volume {
                    host_path: "/tmp".into(),
                    container_path: "/data".into(),
                    read_only: true,
                }],
                ..Default::default()
            },
            Code::FailedPrecondition,
            "--volume-root",
        ),
    ];
    for (what, container, want, mention) in cases {
        let err =
            e.c.runtime()
                .run_cell(pb::Cell {
                    name: "bad".into(),
                    container: Some(container),
                    ..Default::default()
                })
                .await
                .unwrap_err();
        assert_eq!(err.code(), want, "{what}: {err:?}");
        assert!(err.message().contains(mention), "{what}: {}", err.message());
        let left = e.c.cells().get(pb::NameRef { name: "bad".into() }).await;
        assert_eq!(
            left.unwrap_err().code(),
            Code::NotFound,
            "{what}: the cell is gone"
        );
        assert_eq!(e.containers_left(), 0, "{what}");
    }
    // argv with a container is a request error.
    let err =
        e.c.runtime()
            .run_executable(pb::Executable {
                cell: "x".into(),
                argv: vec!["/bin/sh".into()],
                container: Some(e.container("true")),
                env: BTreeMap::new().into_iter().collect(),
                ..Default::default()
            })
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("argv"), "{}", err.message());
}

/// Directories given to a container (`Container.files`) are kubelet's atomic layout;
/// a read-only one is written again while it runs (`Executables/UpdateFiles`: the new
/// set through the same names), the container cannot change it (read-only), and a
/// writable one is never written again (the container could put links where auraed
/// writes): refused naming `files[0].path`, as is a path it was not given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_directories_are_written_again_only_when_read_only() {
    let Some(e) = env(
        "given_directories_are_written_again_only_when_read_only",
        &[],
    )
    .await
    else {
        return;
    };
    let c = &e.c;
    let dir = |path: &str, read_only: bool, entries: &[(&str, &str)]| pb::ContainerFile {
        path: path.into(),
        read_only,
        entries: entries
            .iter()
            .map(|(n, v)| pb::DirectoryEntry {
                name: (*n).into(),
                content: v.as_bytes().to_vec(),
                mode: 0,
            })
            .collect(),
        directory: true,
        ..Default::default()
    };
    c.cells()
        .allocate(pb::Cell {
            name: "given".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut container = e.container("exec sleep 300");
    container.files = vec![
        dir("/conf", true, &[("token", "one"), ("sub/key", "k1")]),
        dir("/data", false, &[("a", "x")]),
        // An empty ConfigMap: a directory with nothing in it, not a file.
        dir("/empty", true, &[]),
    ];
    c.runtime()
        .run_executable(pb::Executable {
            cell: "given".into(),
            name: "app".into(),
            container: Some(container),
            ..Default::default()
        })
        .await
        .unwrap();
    let exec = |script: &str| {
        let c = c.clone();
        let script = script.to_owned();
        async move {
            let r = c
                .executables()
                .exec(pb::ExecRequest {
                    executable: Some(workload::exe_ref("given", "app")),
                    argv: vec!["sh".into(), "-c".into(), script],
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            String::from_utf8_lossy(&r.stdout).into_owned()
        }
    };
    assert_eq!(exec("cat /conf/token /conf/sub/key").await, "onek1");
    // The container cannot swap what auraed writes.
    let out = exec("ln -sfn /etc /conf/..data 2>&1 || echo refused").await;
    assert!(out.contains("refused"), "{out}");
    let update = |files: Vec<pb::ContainerFile>| {
        let c = c.clone();
        async move {
            c.executables()
                .update_files(pb::UpdateFilesRequest {
                    executable: Some(workload::exe_ref("given", "app")),
                    files,
                })
                .await
        }
    };
    update(vec![dir(
        "/conf",
        true,
        &[("token", "two"), ("ca.crt", "pem")],
    )])
    .await
    .unwrap();
    assert_eq!(
        exec("cat /conf/token /conf/ca.crt; ls /conf").await,
        "twopemca.crt\ntoken\n"
    );
    for (bad, why) in [
        (dir("/data", false, &[("a", "y")]), "writable"),
        (dir("/elsewhere", true, &[("a", "y")]), "not given"),
    ] {
        let err = update(vec![bad]).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{why}: {err:?}");
        assert!(err.message().starts_with("files[0].path"), "{why}: {err:?}");
    }
    assert_eq!(exec("cat /data/a").await, "x");
    // The empty directory is one, fills later, and a directory can empty again.
    assert_eq!(
        exec("test -d /empty && ls /empty | wc -l").await.trim(),
        "0"
    );
    update(vec![
        dir("/empty", true, &[("late", "v")]),
        dir("/conf", true, &[]),
    ])
    .await
    .unwrap();
    assert_eq!(exec("cat /empty/late; ls /conf | wc -l").await, "v0\n");
    c.cells()
        .free(pb::NameRef {
            name: "given".into(),
        })
        .await
        .unwrap();
    assert_eq!(e.containers_left(), 0);
}

/// A cell's directories (`Container.cell_directories`, a pod's emptyDir): made empty
/// (0777) by the first container naming one, shared by the cell's containers (read-only
/// where asked, also by one started after another ended), not by another cell's; a link
/// a container leaves there is never followed; kept across a `kill -9` of auraed; gone with
/// the cell, and a stray one (a crash between a free's steps) gone at the next start;
/// bad names and paths refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cell_directories_are_shared_by_a_cells_containers_and_go_with_it() {
    let Some(mut e) = env(
        "cell_directories_are_shared_by_a_cells_containers_and_go_with_it",
        &[],
    )
    .await
    else {
        return;
    };
    let dirs = e.d.dir.path().join("state/cell-dirs");
    let image = e.image.clone();
    let with = |script: &str, d: &[(&str, &str, bool)]| {
        let mut c = pb::Container {
            image: image.clone(),
            entrypoint: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        };
        c.cell_directories = d
            .iter()
            .map(|(name, path, read_only)| pb::CellDirectory {
                name: (*name).into(),
                path: (*path).into(),
                read_only: *read_only,
            })
            .collect();
        c
    };
    let run = |c: Client, cell: &str, name: &str, mut container: pb::Container, uid: u32| {
        let (cell, name) = (cell.to_owned(), name.to_owned());
        (container.uid, container.gid) = (Some(uid), Some(uid));
        async move {
            c.runtime()
                .run_executable(pb::Executable {
                    cell: cell.clone(),
                    name: name.clone(),
                    container: Some(container),
                    run: Some(pb::RunOptions {
                        wait: true,
                        output: true,
                        remove: true,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .map(|r| {
                    let st = r.into_inner();
                    let out: String = st
                        .output
                        .iter()
                        .map(|c| String::from_utf8_lossy(&c.data).into_owned())
                        .collect();
                    (code(&st), out)
                })
        }
    };
    for cell in ["pod", "other"] {
        e.c.cells()
            .allocate(pb::Cell {
                name: cell.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // The first: the directory is new, empty, 0777; it writes and leaves links to the host.
    let first = with(
        "stat -c %a /cache; ls -A /cache | wc -l; echo one > /cache/a; \
         ln -s /etc /cache/etc; ln -s / /cache/root; echo done",
        &[("cache", "/cache", false)],
    );
    let (code0, out) = run(e.c.clone(), "pod", "first", first, 0).await.unwrap();
    assert_eq!((code0, out.as_str()), (Some(0), "777\n0\ndone\n"));
    let host = dirs.join("pod/_dir.cache");
    assert_eq!(std::fs::read_to_string(host.join("a")).unwrap(), "one\n");
    // Another container of the cell, not root, at another path: what the first wrote;
    // it writes too (0777, as kubelet's emptyDir). A file given to it below that path is
    // mounted after the directory (parents first), not hidden under it.
    let mut second = with(
        "cat /data/a; echo two > /data/b && echo wrote; readlink /data/etc; cat /data/conf/given",
        &[("cache", "/data", false)],
    );
    second.files = vec![pb::ContainerFile {
        path: "/data/conf/given".into(),
        content: b"given\n".to_vec(),
        read_only: true,
        ..Default::default()
    }];
    let (code1, out) = run(e.c.clone(), "pod", "second", second, 1000)
        .await
        .unwrap();
    assert_eq!(
        (code1, out.as_str()),
        (Some(0), "one\nwrote\n/etc\ngiven\n")
    );
    // Read-only where asked.
    let reader = with(
        "cat /ro/b; touch /ro/c 2>/dev/null && echo written || echo refused",
        &[("cache", "/ro", true)],
    );
    let (code2, out) = run(e.c.clone(), "pod", "reader", reader, 0).await.unwrap();
    assert_eq!((code2, out.as_str()), (Some(0), "two\nrefused\n"));
    // A link to the host (through /proc: the cell init's root is the host's) left in the
    // shared directory by one container: a later container's mount below it is refused,
    // and nothing is made on the host (mount points are made from the container's root,
    // never through a magic link).
    let planter = with(
        "ln -s /proc/1/root/tmp /cache/host && echo planted",
        &[("cache", "/cache", false)],
    );
    let (_, out) = run(e.c.clone(), "pod", "planter", planter, 0)
        .await
        .unwrap();
    assert_eq!(out, "planted\n");
    let marker = format!("aurae-escape-{}", std::process::id());
    for (path, what) in [
        (format!("/cache/host/{marker}/f"), "a directory"),
        (format!("/cache/host/{marker}.file"), "a file"),
    ] {
        let mut victim = with("true", &[("cache", "/cache", false)]);
        victim.files = vec![pb::ContainerFile {
            path: path.clone(),
            content: b"x".to_vec(),
            read_only: true,
            ..Default::default()
        }];
        let err = run(e.c.clone(), "pod", "victim", victim, 0)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{what}: {err:?}");
        assert!(err.message().contains(&path), "{what}: {err:?}");
        for made in [format!("/tmp/{marker}"), format!("/tmp/{marker}.file")] {
            assert!(
                !Path::new(&made).exists(),
                "{what}: {made} made on the host"
            );
        }
    }
    // Another cell's directory of the same name is its own.
    let other = with("ls -A /cache | wc -l", &[("cache", "/cache", false)]);
    let (_, out) = run(e.c.clone(), "other", "x", other, 0).await.unwrap();
    assert_eq!(out, "0\n", "another cell shares nothing");

    // Bad input, refused naming the field; nothing is made.
    for (d, field) in [
        (
            ("Bad_Name", "/x", false),
            "container.cell_directories[0].name",
        ),
        (
            ("ok", "/dev/x", false),
            "container.cell_directories[0].path",
        ),
        (
            ("ok", "/proc/x", false),
            "container.cell_directories[0].path",
        ),
        (("ok", "x", false), "container.cell_directories[0].path"),
    ] {
        let err = run(e.c.clone(), "pod", "bad", with("true", &[d]), 0)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{d:?}: {err:?}");
        assert!(err.message().starts_with(field), "{d:?}: {err:?}");
    }
    assert!(!dirs.join("pod/_dir.ok").exists());

    // A kill -9 of auraed: the cell is found again with its directory; a stray directory
    // of a cell no record explains is removed at that start.
    std::fs::create_dir_all(dirs.join("ghost/_dir.left")).unwrap();
    std::fs::write(dirs.join("ghost/_dir.left/f"), b"x").unwrap();
    e.d.crash_and_restart().await.unwrap();
    let c = e.d.client("admin").await.unwrap();
    assert!(
        !dirs.join("ghost").exists(),
        "the stray directory is removed"
    );
    let after = with("cat /cache/a /cache/b", &[("cache", "/cache", false)]);
    let (_, out) = run(c.clone(), "pod", "after", after, 0).await.unwrap();
    assert_eq!(out, "one\ntwo\n", "kept across the crash");

    // A tree deeper than any path (20 chains of 1000 levels, each moved to the bottom of
    // the next: 20 000 levels): removed with the cell below, auraed up (a removal
    // recursing once per level would not be).
    let deep = with(
        "cd /cache && prev= && for k in $(seq 20); do p=c$k; i=0; \
         while [ $i -lt 1000 ]; do p=$p/d; i=$((i+1)); done; mkdir -p $p || exit 1; \
         if [ -n \"$prev\" ]; then mv $prev $p/ || exit 1; fi; prev=c$k; done; echo deep",
        &[("cache", "/cache", false)],
    );
    let (_, out) = run(c.clone(), "pod", "deep", deep, 0).await.unwrap();
    assert_eq!(out, "deep\n");
    // Freed with the cell; the links it held were not followed.
    c.cells()
        .free(pb::NameRef { name: "pod".into() })
        .await
        .unwrap();
    for _ in 0..600 {
        if std::fs::read_dir(&dirs).unwrap().count() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!dirs.join("pod").exists(), "gone with the cell");
    let left: Vec<_> = std::fs::read_dir(&dirs)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("other")],
        "removed in the background"
    );
    c.daemon().info(pb::InfoRequest {}).await.unwrap();
    assert!(Path::new("/etc/passwd").exists());
    c.cells()
        .free(pb::NameRef {
            name: "other".into(),
        })
        .await
        .unwrap();
    for _ in 0..100 {
        if std::fs::read_dir(&dirs).unwrap().count() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(std::fs::read_dir(&dirs).unwrap().count(), 0, "nothing left");
    assert_eq!(e.containers_left(), 0);
}

/// auraed holds a running container's mount namespace, so the container's exit is not
/// held up by its mounts going (they go after, off the exit's path): held while it runs,
/// let go once it has exited, nothing left when its cell is freed — also when the cell is
/// freed while the container still runs (the namespace then goes before its directories).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_containers_mounts_go_after_its_exit() {
    let Some(e) = env("a_containers_mounts_go_after_its_exit", &[]).await else {
        return;
    };
    let auraed = e.d.pid().unwrap();
    for (cell, script) in [("ends", "sleep 1; exit 3"), ("freed", "sleep 30")] {
        let st =
            e.c.runtime()
                .run_cell(pb::Cell {
                    name: cell.into(),
                    container: Some(e.container(script)),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
        let exe = &st.executables[0];
        let ns = aurae_testkit::namespace_of(exe.pid.unsigned_abs(), "mnt").unwrap();
        assert_ne!(ns, std::fs::read_link("/proc/self/ns/mnt").unwrap());
        assert!(
            aurae_testkit::namespaces_held(auraed, "mnt").contains(&ns),
            "{cell}: auraed holds the running container's mount namespace {}",
            ns.display()
        );
        if cell == "ends" {
            let exit = workload::wait(&e.c, cell, &exe.name).await.unwrap();
            assert_eq!(code(&exit), Some(3));
            let t = std::time::Instant::now();
            while aurae_testkit::namespaces_held(auraed, "mnt").contains(&ns)
                && t.elapsed() < std::time::Duration::from_secs(2)
            {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            assert!(
                !aurae_testkit::namespaces_held(auraed, "mnt").contains(&ns),
                "let go after the exit"
            );
        }
        e.c.cells()
            .free(pb::NameRef { name: cell.into() })
            .await
            .unwrap();
        assert!(
            !aurae_testkit::namespaces_held(auraed, "mnt").contains(&ns),
            "{cell}"
        );
        assert_eq!(e.containers_left(), 0, "{cell}: its directories are gone");
    }
}

/// An exec runs as the container's process does, so it is authorized as running as that
/// user: a tenant without uid 0 got a root shell (all default capabilities) in a root
/// container another identity started under its names. Also an attach that writes the
/// input of a root process. Both PERMISSION_DENIED now, naming the user; the tenant's
/// own container (uid 1000) still takes an exec.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_is_authorized_as_the_user_it_runs_as() {
    let id = |who: &str| format!("spiffe://{}/operator/{who}", aurae_testkit::TRUST_DOMAIN);
    let policy = format!(
        "[[grant]]\nid = \"{}\"\nmethods = [\"*\"]\nnames = [\"*\"]\nregistries = [\"*\"]\n\
         allow_uid_zero = true\nuids = [\"1-2147483647\"]\ngids = [\"1-2147483647\"]\n\n\
         [[grant]]\nid = \"{}\"\nmethods = [\"*\"]\nnames = [\"team-a\"]\n\
         uids = [\"1000-1999\"]\ngids = [\"1000-1999\"]\n",
        id("admin"),
        id("alice")
    );
    let Some(e) = env_with(
        "an_exec_is_authorized_as_the_user_it_runs_as",
        &[],
        Some(policy),
    )
    .await
    else {
        return;
    };
    let alice = e.d.client("alice").await.unwrap();
    e.c.cells()
        .allocate(pb::Cell {
            name: "team-a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // The admin's root container, and one as uid 1000, under alice's names.
    for (name, uid) in [("root", 0), ("user", 1000)] {
        let mut container = e.container("exec sleep 300");
        container.uid = Some(uid);
        container.gid = Some(uid);
        e.c.runtime()
            .run_executable(pb::Executable {
                cell: "team-a".into(),
                name: name.into(),
                container: Some(container),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let exec = |c: &Client, name: &str| {
        let (c, name) = (c.clone(), name.to_owned());
        async move {
            c.executables()
                .exec(pb::ExecRequest {
                    executable: Some(workload::exe_ref("team-a", &name)),
                    argv: vec!["id".into(), "-u".into()],
                    ..Default::default()
                })
                .await
                .map(|r| {
                    String::from_utf8_lossy(&r.into_inner().stdout)
                        .trim()
                        .to_owned()
                })
        }
    };
    let denied = exec(&alice, "root").await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("uid 0"), "{}", denied.message());
    assert_eq!(exec(&alice, "user").await.unwrap(), "1000");
    assert_eq!(exec(&e.c, "root").await.unwrap(), "0", "the admin may");
    // Writing a root process's input is acting as it.
    e.c.runtime()
        .run_executable(pb::Executable {
            cell: "team-a".into(),
            name: "shell".into(),
            container: Some(e.container("exec cat")),
            interactive: Some(pb::Interactive {
                stdin: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let attach = |c: &Client, stdin: bool| {
        let c = c.clone();
        async move {
            let start = pb::AttachInput {
                what: Some(pb::attach_input::What::Start(pb::AttachStart {
                    executable: Some(workload::exe_ref("team-a", "shell")),
                    stdin,
                    ..Default::default()
                })),
            };
            c.executables()
                .attach(tokio_stream::iter(vec![start]))
                .await
                .map(|_| ())
        }
    };
    let denied = attach(&alice, true).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains("start.stdin"),
        "{}",
        denied.message()
    );
    attach(&alice, false)
        .await
        .expect("reading its output is not acting as it");
    attach(&e.c, true).await.expect("the admin may");
    e.c.cells()
        .free(pb::NameRef {
            name: "team-a".into(),
        })
        .await
        .unwrap();
}
