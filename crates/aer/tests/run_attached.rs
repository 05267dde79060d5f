//! `aer run` and `aer run-cell` in the foreground against a real auraed (host tier: root and
//! a cgroup v2 hierarchy; run-cell also needs the `docker-registry` package and a static
//! busybox): the workload's output on aer's stdout/stderr, complete and in order; aer's
//! exit code is the workload's (128+N for signal N, 125 for aer's own failures); Ctrl-C and
//! SIGTERM stop the workload and a second Ctrl-C kills it; `--rm` leaves nothing (with
//! `-d` auraed frees it at its end); `-d` prints the id and returns while the workload runs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    path::Path,
    time::{Duration, Instant},
};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    Daemon, DaemonOptions,
    cli::{Aer, Ran, auraed_beside},
    oci,
    registry::for_containers,
    tier::{self, Tier},
    workload::exe_ref,
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tonic::Code;

const AER: &str = env!("CARGO_BIN_EXE_aer");
const LIMIT: Duration = Duration::from_secs(60);

struct Env {
    d: Daemon,
    c: Client,
    aer: Aer,
}

async fn start(extra_args: Vec<String>) -> Env {
    let auraed = auraed_beside(Path::new(AER)).unwrap();
    let d = Daemon::start(
        &auraed,
        DaemonOptions {
            extra_args,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let c = d.client("admin").await.unwrap();
    let aer = Aer::new(Path::new(AER), &d).unwrap();
    Env { d, c, aer }
}

/// A daemon with cell `c` allocated, or `None` (a visible SKIP) without root and cgroup v2.
async fn env(test: &str) -> Option<Env> {
    if !tier::check(test, Tier::Host, tier::needs_cells()) {
        return None;
    }
    let e = start(Vec::new()).await;
    e.c.cells()
        .allocate(pb::Cell {
            name: "c".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    Some(e)
}

impl Env {
    fn aer(&self, args: &[&str]) -> Ran {
        self.aer.run(args, LIMIT).unwrap()
    }

    async fn get(&self, cell: &str, name: &str) -> Result<pb::ExecutableStatus, tonic::Status> {
        self.c
            .executables()
            .get(exe_ref(cell, name))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Waits until executable `cell/name` runs (aer created it) and returns its status.
    async fn running(&self, cell: &str, name: &str) -> pb::ExecutableStatus {
        let start = Instant::now();
        loop {
            if let Ok(s) = self.get(cell, name).await
                && s.phase == pb::Phase::Running as i32
                && s.pid > 0
            {
                return s;
            }
            assert!(
                start.elapsed() < LIMIT,
                "{cell}/{name} never ran:\n{}",
                self.d.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn cells(&self) -> Vec<String> {
        let l = self.c.cells().list(pb::ListRequest::default()).await;
        l.unwrap()
            .into_inner()
            .cells
            .into_iter()
            .map(|c| c.name)
            .collect()
    }
}

/// A sleep length (seconds) unique to this test process and `n`: its command line tells
/// the test's own sleeps from any other's.
fn marker(n: u32) -> String {
    format!("{}{n:02}", std::process::id())
}

/// Processes whose command line is exactly `argv`.
fn processes(argv: &[&str]) -> Vec<i32> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            (std::fs::read(e.path().join("cmdline")).ok()? == want).then_some(pid)
        })
        .collect()
}

fn sigint(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGINT).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workloads_output_and_exit_code_are_aers() {
    let Some(e) = env("the_workloads_output_and_exit_code_are_aers").await else {
        return;
    };
    let r = e.aer(&[
        "run",
        "--cell",
        "c",
        "--name",
        "three",
        "--",
        "/bin/sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(r.code(), Some(3), "{r}");
    assert_eq!(r.stdout, "out\n", "{r}");
    assert!(r.stderr.contains("err\n"), "{r}");
    // Without --rm it stays for `aer executable …`.
    let s = e.get("c", "three").await.unwrap();
    assert_eq!(s.phase, pb::Phase::Exited as i32);

    let r = e.aer(&["run", "--cell", "c", "--", "/bin/true"]);
    assert_eq!((r.code(), r.stdout.as_str()), (Some(0), ""), "{r}");

    // Killed by a signal: 128+N, and a one-line note naming it.
    for (sig, code, name) in [("KILL", 137, "SIGKILL"), ("TERM", 143, "SIGTERM")] {
        let script = format!("echo before; kill -{sig} $$; echo after");
        let r = e.aer(&["run", "--cell", "c", "--", "/bin/sh", "-c", &script]);
        assert_eq!(r.code(), Some(code), "{r}");
        assert_eq!(r.stdout, "before\n", "{r}");
        let note = format!("killed by signal {} ({name})", code - 128);
        assert!(r.stderr.contains(&note), "{r}");
    }
}

/// Every line, in order, although the workload writes them all at once and exits: what it
/// wrote before the stream opened and what was still in its pipe at its exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_complete_and_in_order() {
    let Some(e) = env("output_is_complete_and_in_order").await else {
        return;
    };
    let m2 = marker(2);
    let script = "i=1; while [ $i -le 2000 ]; do echo \"line $i\"; i=$((i+1)); done; \
                  echo done >&2";
    for round in 0..3 {
        let r = e.aer(&["run", "--cell", "c", "--rm", "--", "/bin/sh", "-c", script]);
        assert_eq!(r.code(), Some(0), "round {round}: {r}");
        let want: String = (1..=2000).map(|i| format!("line {i}\n")).collect();
        assert!(
            r.stdout == want,
            "round {round}: {} lines, the last {:?}",
            r.stdout.lines().count(),
            r.stdout.lines().last()
        );
        assert_eq!(r.stderr, "done\n", "round {round}: {r}");
    }
    // More than auraed keeps (1 MiB) written as fast as it can: either all of it arrives,
    // or aer says how many bytes were lost, and what it printed plus what it lost is all
    // of it, never a byte twice, ending with the last line.
    let r = e.aer(&[
        "run",
        "--cell",
        "c",
        "--rm",
        "--",
        "/usr/bin/seq",
        "1",
        "300000",
    ]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    let want: String = (1..=300_000).map(|i| format!("{i}\n")).collect();
    let lost: Option<usize> = r.stderr.lines().find_map(|l| {
        l.strip_prefix("aer: ")?
            .split_once(" bytes of c/")?
            .0
            .parse()
            .ok()
    });
    match lost {
        None => assert!(
            r.stdout == want,
            "{} bytes, no loss reported",
            r.stdout.len()
        ),
        Some(n) => {
            assert_eq!(r.stdout.len() + n, want.len(), "{}", r.stderr);
            assert!(r.stdout.ends_with("299999\n300000\n"));
        }
    }
    assert!(!r.stderr.contains("still open"), "{}", r.stderr);

    // Output still open after the exit (a background child holds the pipes): aer stops
    // following it soon and says so, with what was written so far.
    let start = Instant::now();
    let r = e.aer(&[
        "run",
        "--cell",
        "c",
        "--",
        "/bin/sh",
        "-c",
        &format!("echo hi; (exec /bin/sleep {m2}) & exit 0"),
    ]);
    assert_eq!((r.code(), r.stdout.as_str()), (Some(0), "hi\n"), "{r}");
    assert!(r.stderr.contains("output is still open"), "{r}");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    for pid in processes(&["/bin/sleep", &m2]) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_the_workload_and_a_second_kills_it() {
    let Some(e) = env("ctrl_c_stops_the_workload_and_a_second_kills_it").await else {
        return;
    };
    let (m3, m4, m5) = (marker(3), marker(4), marker(5));
    // SIGINT: Executables/Stop (SIGTERM); aer waits and exits with the workload's 143.
    let run = e
        .aer
        .spawn(&[
            "run",
            "--cell",
            "c",
            "--name",
            "long",
            "--",
            "/bin/sleep",
            &m3,
        ])
        .unwrap();
    e.running("c", "long").await;
    sigint(run.pid());
    let r = run.finish(LIMIT).unwrap();
    assert_eq!(r.code(), Some(143), "{r}");
    assert!(r.stderr.contains("SIGINT: stopping c/long"), "{r}");
    assert!(r.stderr.contains("killed by signal 15 (SIGTERM)"), "{r}");
    let after = e.get("c", "long").await.unwrap();
    assert_eq!(
        after.exit.unwrap().how,
        Some(pb::exit_status::How::Signal(15))
    );
    assert!(processes(&["/bin/sleep", &m3]).is_empty());

    // SIGTERM to aer does the same.
    let run = e
        .aer
        .spawn(&[
            "run",
            "--cell",
            "c",
            "--name",
            "termed",
            "--",
            "/bin/sleep",
            &m4,
        ])
        .unwrap();
    e.running("c", "termed").await;
    kill(Pid::from_raw(run.pid() as i32), Signal::SIGTERM).unwrap();
    let r = run.finish(LIMIT).unwrap();
    assert_eq!(r.code(), Some(143), "{r}");
    assert!(processes(&["/bin/sleep", &m4]).is_empty());

    // A workload that ignores SIGTERM: the first Ctrl-C asks (a long grace), the second
    // kills it at once: 137, long before the grace is over.
    let start = Instant::now();
    let run = e
        .aer
        .spawn(&[
            "run",
            "--cell",
            "c",
            "--name",
            "stubborn",
            "--stop-grace",
            "5m",
            "--rm",
            "--",
            "/bin/sh",
            "-c",
            &format!("trap '' TERM; exec /bin/sleep {m5}"),
        ])
        .unwrap();
    e.running("c", "stubborn").await;
    // The shell has exec'd sleep (which keeps SIGTERM ignored).
    let t = Instant::now();
    while processes(&["/bin/sleep", &m5]).is_empty() {
        assert!(t.elapsed() < LIMIT);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sigint(run.pid());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        processes(&["/bin/sleep", &m5]).len(),
        1,
        "SIGTERM is ignored"
    );
    sigint(run.pid());
    let r = run.finish(LIMIT).unwrap();
    assert_eq!(r.code(), Some(137), "{r}");
    assert!(r.stderr.contains("SIGINT: killing c/stubborn"), "{r}");
    assert!(start.elapsed() < Duration::from_secs(60));
    assert!(processes(&["/bin/sleep", &m5]).is_empty());
    // --rm after Ctrl-C: freed.
    assert_eq!(
        e.get("c", "stubborn").await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rm_frees_and_detach_prints_the_id() {
    let Some(e) = env("rm_frees_and_detach_prints_the_id").await else {
        return;
    };
    let m6 = marker(6);
    let r = e.aer(&[
        "run", "--cell", "c", "--name", "gone", "--rm", "--", "/bin/sh", "-c", "exit 4",
    ]);
    assert_eq!(r.code(), Some(4), "{r}");
    assert_eq!(e.get("c", "gone").await.unwrap_err().code(), Code::NotFound);
    let l =
        e.c.executables()
            .list(pb::ListExecutablesRequest::default())
            .await
            .unwrap()
            .into_inner();
    assert!(l.executables.is_empty(), "{l:?}");

    // -d: the id on stdout, back while the workload still runs.
    let start = Instant::now();
    let r = e.aer(&[
        "run",
        "-d",
        "--cell",
        "c",
        "--name",
        "bg",
        "--",
        "/bin/sleep",
        &m6,
    ]);
    assert_eq!((r.code(), r.stdout.as_str()), (Some(0), "c/bg\n"), "{r}");
    assert!(start.elapsed() < Duration::from_secs(20));
    assert_eq!(
        e.get("c", "bg").await.unwrap().phase,
        pb::Phase::Running as i32
    );
    let r = e.aer(&[
        "run",
        "-d",
        "-o",
        "json",
        "--cell",
        "c",
        "--",
        "/bin/sleep",
        &m6,
    ]);
    assert_eq!(r.code(), Some(0), "{r}");
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let id = j["id"].as_str().unwrap();
    assert_eq!(j["cell"], "c");
    assert_eq!(id, format!("c/{}", j["name"].as_str().unwrap()));
    assert!(j["pid"].as_i64().unwrap() > 0, "{j}");
    assert_eq!(j["phase"], "running");
    assert_eq!(processes(&["/bin/sleep", &m6]).len(), 2);
    // Both stopped by the daemon's drop (its cgroup is killed); stop one here as a user would.
    let r = e.aer(&["executable", "stop", "c/bg", "--grace", "1s"]);
    assert_eq!(r.code(), Some(0), "{r}");

    // --rm with -d: auraed frees it at its end (run.remove), aer has long returned.
    let r = e.aer(&[
        "run",
        "-d",
        "--rm",
        "--cell",
        "c",
        "--name",
        "gone",
        "--",
        "/bin/sleep",
        "0.5",
    ]);
    assert_eq!((r.code(), r.stdout.as_str()), (Some(0), "c/gone\n"), "{r}");
    assert_eq!(
        e.get("c", "gone").await.unwrap().phase,
        pb::Phase::Running as i32
    );
    let start = Instant::now();
    while e.get("c", "gone").await.is_ok() {
        assert!(start.elapsed() < LIMIT, "c/gone was never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aers_own_failures_exit_125_naming_the_field() {
    let Some(e) = env("aers_own_failures_exit_125_naming_the_field").await else {
        return;
    };
    // No program.
    let r = e.aer(&["run", "--cell", "c"]);
    assert_eq!(r.code(), Some(125), "{r}");
    assert!(r.stderr.contains("argv"), "{r}");
    // No --cell (clap refuses it).
    let r = e.aer(&["run", "--", "/bin/true"]);
    assert_eq!(r.code(), Some(125), "{r}");
    assert!(r.stderr.contains("--cell"), "{r}");
    // A cell that does not exist (auraed refuses it).
    let r = e.aer(&["run", "--cell", "nosuch", "--", "/bin/true"]);
    assert_eq!(r.code(), Some(125), "{r}");
    assert!(r.stderr.contains("nosuch"), "{r}");
    // A relative program.
    let r = e.aer(&["run", "--cell", "c", "--", "true"]);
    assert_eq!(r.code(), Some(125), "{r}");
    assert!(r.stderr.contains("argv"), "{r}");
    // A flag aer does not know, and run-cell without an image.
    let r = e.aer(&["run", "--cell", "c", "--bogus", "--", "/bin/true"]);
    assert_eq!(r.code(), Some(125), "{r}");
    let r = e.aer(&["run-cell", "web"]);
    assert_eq!(r.code(), Some(125), "{r}");
    assert!(r.stderr.contains("--image"), "{r}");
    // auraed unreachable.
    let nowhere = Aer {
        socket: e.d.dir.path().join("nothing-here.sock"),
        ..e.aer.clone()
    };
    let r = nowhere
        .run(&["run", "--cell", "c", "--", "/bin/true"], LIMIT)
        .unwrap();
    assert_eq!(r.code(), Some(125), "{r}");
    assert!(r.stderr.contains("nothing-here.sock"), "{r}");
    // Other commands keep their own codes (clap's 2 for a usage error).
    let r = e.aer(&["cell", "allocate"]);
    assert_eq!(r.code(), Some(2), "{r}");
    // Nothing was left running by any of these.
    let l =
        e.c.executables()
            .list(pb::ListExecutablesRequest::default())
            .await
            .unwrap()
            .into_inner();
    assert!(l.executables.is_empty(), "{l:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_cell_rm_runs_an_image_and_leaves_no_cell() {
    let test = "run_cell_rm_runs_an_image_and_leaves_no_cell";
    let Some(registry) = for_containers(test).unwrap() else {
        return;
    };
    let (m7, m8) = (marker(7), marker(8));
    let host = registry.host();
    oci::push_busybox(
        &host,
        "aurae/busybox",
        serde_json::json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]}),
    )
    .unwrap();
    let e = start(vec!["--insecure-registry".into(), host.clone()]).await;
    let image = format!("{host}/aurae/busybox:v1");
    let r = e.aer(&[
        "run-cell", "--rm", "web", "--image", &image, "--", "echo", "hi",
    ]);
    assert_eq!((r.code(), r.stdout.as_str()), (Some(0), "hi\n"), "{r}");
    let r = e.aer(&[
        "run-cell", "--rm", "web", "--image", &image, "--", "sh", "-c", "exit 3",
    ]);
    assert_eq!((r.code(), r.stdout.as_str()), (Some(3), ""), "{r}");
    assert!(e.cells().await.is_empty(), "{:?}", e.cells().await);

    // Ctrl-C: the container is stopped (SIGTERM) and the cell freed.
    let run = e
        .aer
        .spawn(&[
            "run-cell",
            "--rm",
            "--stop-grace",
            "1s",
            "job",
            "--image",
            &image,
            "--",
            "sleep",
            &m7,
        ])
        .unwrap();
    let t = Instant::now();
    while e.cells().await.is_empty() || processes(&["sleep", &m7]).is_empty() {
        assert!(t.elapsed() < LIMIT, "{}", e.d.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sigint(run.pid());
    let r = run.finish(LIMIT).unwrap();
    assert_eq!(r.code(), Some(143), "{r}");
    assert!(r.stderr.contains("killed by signal 15 (SIGTERM)"), "{r}");
    assert!(e.cells().await.is_empty(), "{:?}", e.cells().await);
    assert!(processes(&["sleep", &m7]).is_empty());

    // -d: the executable's id, and in JSON its cell and the image digest.
    let r = e.aer(&[
        "run-cell", "-d", "-o", "json", "bg", "--image", &image, "--", "sleep", &m8,
    ]);
    assert_eq!(r.code(), Some(0), "{r}");
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        (j["id"].as_str(), j["cell"].as_str()),
        (Some("bg/busybox"), Some("bg")),
        "{j}"
    );
    assert!(
        j["image_digest"].as_str().unwrap().starts_with("sha256:"),
        "{j}"
    );
    let r = e.aer(&[
        "run-cell", "-d", "bg2", "--image", &image, "--", "sleep", &m8,
    ]);
    assert_eq!(
        (r.code(), r.stdout.as_str()),
        (Some(0), "bg2/busybox\n"),
        "{r}"
    );
    for cell in ["bg", "bg2"] {
        e.c.cells()
            .free(pb::NameRef { name: cell.into() })
            .await
            .unwrap();
    }
    assert!(processes(&["sleep", &m8]).is_empty());
}

/// `--rm` frees only what this aer created: when someone else frees the workload while aer
/// still copies its output and uses the name again, aer leaves the new one running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rm_leaves_a_name_someone_else_used_again() {
    let Some(e) = env("rm_leaves_a_name_someone_else_used_again").await else {
        return;
    };
    let m7 = marker(7);
    // It exits at once, but a process it started holds its output open: aer follows that
    // output for a few seconds after the exit, and then frees with --rm.
    let script = format!("/bin/sleep {m7} & exit 0");
    let aer = e
        .aer
        .spawn(&[
            "run", "--cell", "c", "--name", "job", "--rm", "--", "/bin/sh", "-c", &script,
        ])
        .unwrap();
    let start = Instant::now();
    let mine = loop {
        if let Ok(s) = e.get("c", "job").await
            && s.phase == pb::Phase::Exited as i32
        {
            break s;
        }
        assert!(start.elapsed() < LIMIT, "c/job never exited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Another client frees it and starts its own `job`.
    e.c.executables().free(exe_ref("c", "job")).await.unwrap();
    let theirs =
        e.c.runtime()
            .run_executable(pb::Executable {
                cell: "c".into(),
                name: "job".into(),
                argv: vec!["/bin/sleep".into(), m7.clone()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert_ne!(theirs.started_at, mine.started_at);
    let r = aer.finish(LIMIT).unwrap();
    let now = e.get("c", "job").await;
    assert!(
        now.as_ref().is_ok_and(
            |s| s.phase == pb::Phase::Running as i32 && s.started_at == theirs.started_at
        ),
        "aer --rm stopped or freed the other client's c/job: {now:?}\n{r}"
    );
    assert!(r.stderr.contains("not freeing it"), "{r}");
}

/// `aer exec`: a command inside a running container, its output and exit code aer's;
/// `-i` passes aer's stdin, `-t` gives it a terminal; an unknown executable is NOT_FOUND's
/// exit code, a plain process (not a container) FAILED_PRECONDITION's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_a_command_in_a_running_container() {
    let test = "exec_runs_a_command_in_a_running_container";
    let Some(registry) = for_containers(test).unwrap() else {
        return;
    };
    let host = registry.host();
    oci::push_busybox(
        &host,
        "aurae/busybox",
        serde_json::json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]}),
    )
    .unwrap();
    let e = start(vec!["--insecure-registry".into(), host.clone()]).await;
    let image = format!("{host}/aurae/busybox:v1");
    let r = e.aer(&[
        "run-cell", "-d", "web", "--image", &image, "--", "sleep", "600",
    ]);
    assert_eq!(r.code(), Some(0), "{r}");
    let target = r.stdout.trim().to_owned();
    assert!(target.starts_with("web/"), "{r}");

    let r = e.aer(&[
        "exec",
        &target,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; hostname; exit 3",
    ]);
    assert_eq!(
        (r.code(), r.stdout.as_str()),
        (Some(3), "out\nweb\n"),
        "{r}"
    );
    assert_eq!(r.stderr, "err\n", "{r}");

    // -i: aer's stdin, to its end.
    let mut child = e
        .aer
        .command(&["exec", "-i", &target, "--", "tr", "a-z", "A-Z"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"piped through aer\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "PIPED THROUGH AER\n");

    // -t: a terminal of the container's own.
    let r = e.aer(&[
        "exec",
        "-t",
        &target,
        "--",
        "sh",
        "-c",
        "tty; test -t 1 && exit 5",
    ]);
    assert_eq!(r.code(), Some(5), "{r}");
    assert!(r.stdout.contains("/dev/pts/"), "{r}");

    // aer killed while the command does not read the input it was sent (the pipes
    // full): the call is cancelled and the command killed all the same.
    let m9 = marker(9);
    let mut child = e
        .aer
        .command(&["exec", "-i", &target, "--", "sleep", &m9])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(&vec![b'x'; 4 << 20]);
    });
    let t = Instant::now();
    while processes(&["sleep", &m9]).is_empty() {
        assert!(t.elapsed() < LIMIT, "the exec'd sleep never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let t = Instant::now();
    while !processes(&["sleep", &m9]).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the command of a client that left (its stdin full) still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Refusals keep aer's exit codes for auraed's answers.
    let r = e.aer(&["exec", "web/nosuch", "--", "true"]);
    assert_eq!(r.code(), Some(3), "NOT_FOUND: {r}");
    let r = e.aer(&["exec", "no-slash", "--", "true"]);
    assert_eq!(r.code(), Some(2), "INVALID_ARGUMENT: {r}");
    e.c.cells()
        .allocate(pb::Cell {
            name: "plain".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let r = e.aer(&[
        "run",
        "-d",
        "--cell",
        "plain",
        "--name",
        "p",
        "--",
        "/bin/sleep",
        "600",
    ]);
    assert_eq!(r.code(), Some(0), "{r}");
    let r = e.aer(&["exec", "plain/p", "--", "true"]);
    assert_eq!(
        r.code(),
        Some(6),
        "FAILED_PRECONDITION (not a container): {r}"
    );
    for cell in ["web", "plain"] {
        e.c.cells()
            .stop(pb::StopRequest {
                name: cell.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        e.c.cells()
            .free(pb::NameRef { name: cell.into() })
            .await
            .unwrap();
    }
}

/// `aer run -i` (`docker run -i`): aer's stdin to the process, its end the process's;
/// `-t`: a terminal of its own; `aer run -d -i` keeps the stdin open for `aer attach -i`,
/// which writes it, shows the output from then on and leaves it running when aer goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_i_and_attach_write_a_processs_own_stdin() {
    use std::io::{Read, Write};
    use std::process::Stdio;
    let Some(e) = env("run_i_and_attach_write_a_processs_own_stdin").await else {
        return;
    };
    // -i in the foreground: everything piped in goes through, EOF ends it, its code is aer's.
    let mut child = e
        .aer
        .command(&[
            "run",
            "-i",
            "--rm",
            "--cell",
            "c",
            "--",
            "/bin/sh",
            "-c",
            "tr a-z A-Z; exit 4",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"into its own stdin\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "INTO ITS OWN STDIN\n");

    // -t with -i from a pipe: refused (a terminal gets no end of input from a pipe).
    let r = e.aer(&["run", "-it", "--cell", "c", "--", "/bin/cat"]);
    assert_eq!(r.code(), Some(125), "{r}");
    assert!(r.stderr.contains("not a terminal"), "{r}");

    // -t: its own terminal.
    let r = e.aer(&[
        "run",
        "-t",
        "--rm",
        "--cell",
        "c",
        "--",
        "/bin/sh",
        "-c",
        "test -t 0 && test -t 1 && exit 5",
    ]);
    assert_eq!(r.code(), Some(5), "{r}");

    // -d -i: kept open; an attach writes it and sees only what came after it attached.
    let r = e.aer(&[
        "run",
        "-d",
        "-i",
        "--cell",
        "c",
        "--name",
        "cat",
        "--",
        "/bin/sh",
        "-c",
        "echo before; while read l; do echo \"kept $l\"; done; echo closed",
    ]);
    assert_eq!(r.code(), Some(0), "{r}");
    e.running("c", "cat").await;
    let mut child = e
        .aer
        .command(&["attach", "-i", "c/cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"one\n").unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut got = Vec::new();
    let t = Instant::now();
    while !String::from_utf8_lossy(&got).contains("kept one") {
        let mut buf = [0u8; 256];
        let n = stdout.read(&mut buf).unwrap();
        assert!(
            n > 0 && t.elapsed() < LIMIT,
            "{:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        !String::from_utf8_lossy(&got).contains("before"),
        "only from now"
    );
    // aer's end of input ends aer's writing only: the stdin stays open (not stdin_once).
    drop(stdin);
    sigint(child.id());
    let _ = child.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        e.get("c", "cat").await.unwrap().phase,
        pb::Phase::Running as i32,
        "detached, still reading"
    );
    let mut child = e
        .aer
        .command(&["attach", "-i", "c/cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"two\n").unwrap();
    // Stopped meanwhile: the attach ends with its exit.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = e.aer(&["executable", "stop", "c/cat"]);
    assert_eq!(r.code(), Some(0), "{r}");
    let out = child.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("kept two"),
        "{out:?}"
    );
    assert_eq!(out.status.code(), Some(128 + 15), "{out:?}");

    // Refused: -i to a process started without it; -t to one without a terminal.
    let r = e.aer(&[
        "run",
        "-d",
        "--cell",
        "c",
        "--name",
        "plain",
        "--",
        "/bin/sleep",
        "30",
    ]);
    assert_eq!(r.code(), Some(0), "{r}");
    let r = e.aer(&["attach", "-i", "c/plain"]);
    assert_eq!(r.code(), Some(2), "{r}");
    assert!(r.stderr.contains("stdin"), "{r}");
    // A terminal size to one without a terminal (aer sends one with -t on a terminal).
    let start = pb::AttachInput {
        what: Some(pb::attach_input::What::Start(pb::AttachStart {
            executable: Some(exe_ref("c", "plain")),
            size: Some(pb::TerminalSize {
                width: 80,
                height: 24,
            }),
            ..Default::default()
        })),
    };
    let err =
        e.c.executables()
            .attach(tokio_stream::iter(vec![start]))
            .await
            .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("start.size"), "{err:?}");
    let r = e.aer(&["executable", "stop", "c/plain"]);
    assert_eq!(r.code(), Some(0), "{r}");
}
