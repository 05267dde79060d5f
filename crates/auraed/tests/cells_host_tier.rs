//! Host tier (T1: root and a cgroup v2 hierarchy, even the hybrid one): cells really get
//! new namespaces, processes land in their cgroup, exit codes and signals are right, stop
//! is graceful, logs replay and follow, nothing leaks (zombies, fds, threads, cgroups).
//! Each test runs its own auraed with its own uniquely named cgroup, removed afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    path::Path,
    time::{Duration, Instant},
};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    Daemon, DaemonOptions,
    tier::{self, Tier},
    workload,
};
use tonic::Code;

async fn daemon(test: &str, opts: DaemonOptions) -> Option<(Daemon, Client)> {
    if !tier::check(test, Tier::Host, tier::needs_cells()) {
        return None;
    }
    let d = Daemon::start(Path::new(env!("CARGO_BIN_EXE_auraed")), opts)
        .await
        .unwrap();
    let c = d.client("admin").await.unwrap();
    Some((d, c))
}

async fn allocate(c: &Client, name: &str) -> pb::CellStatus {
    c.cells()
        .allocate(pb::Cell {
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("allocate {name}: {e:?}"))
        .into_inner()
}

fn exe(cell: &str, name: &str, argv: &[&str]) -> pb::Executable {
    pb::Executable {
        cell: cell.into(),
        name: name.into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: [(
            "PATH".to_string(),
            "/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        )]
        .into(),
        ..Default::default()
    }
}

fn sh(cell: &str, name: &str, script: &str) -> pb::Executable {
    exe(cell, name, &["/bin/sh", "-c", script])
}

fn r(cell: &str, name: &str) -> pb::ExecutableRef {
    pb::ExecutableRef {
        cell: cell.into(),
        name: name.into(),
    }
}

async fn run(c: &Client, e: pb::Executable) -> pb::ExecutableStatus {
    let id = format!("{}/{}", e.cell, e.name);
    c.runtime()
        .run_executable(e)
        .await
        .unwrap_or_else(|s| panic!("run {id}: {s:?}"))
        .into_inner()
}

async fn wait(c: &Client, cell: &str, name: &str) -> pb::ExecutableStatus {
    workload::wait(c, cell, name).await.unwrap()
}

async fn output(c: &Client, cell: &str, name: &str) -> String {
    workload::output(c, cell, name).await.unwrap()
}

fn code(s: &pb::ExecutableStatus) -> Option<i32> {
    match s.exit.as_ref()?.how? {
        pb::exit_status::How::Code(c) => Some(c),
        pb::exit_status::How::Signal(_) => None,
    }
}

fn signal(s: &pb::ExecutableStatus) -> Option<i32> {
    match s.exit.as_ref()?.how? {
        pb::exit_status::How::Signal(c) => Some(c),
        pb::exit_status::How::Code(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_has_its_own_namespaces_with_lo_up_and_only_stdio() {
    let Some((d, c)) = daemon(
        "a_cell_has_its_own_namespaces_with_lo_up_and_only_stdio",
        DaemonOptions::default(),
    )
    .await
    else {
        return;
    };
    allocate(&c, "probe").await;
    let script = "echo pid=$$; echo host=$(hostname); grep '^0::' /proc/self/cgroup; echo net=$(ls /sys/class/net); \
                  echo loflags=$(cat /sys/class/net/lo/flags); echo init=$(cat /proc/1/comm); \
                  echo netns=$(readlink /proc/self/ns/net); echo maxpid=$(ls /proc | grep '^[0-9]' | sort -n | tail -1); \
                  for i in $(seq 100); do [ $(awk '/^RssShmem:/ {print $2}' /proc/1/status) -le 2048 ] && break; sleep 0.02; done; \
                  grep -E '^(VmRSS|RssAnon|RssFile|RssShmem):' /proc/1/status | tr -s ' \t' ' ';";
    run(&c, sh("probe", "p", script)).await;
    let st = wait(&c, "probe", "p").await;
    let out = output(&c, "probe", "p").await;
    println!("probe output:\n{out}");
    assert_eq!(code(&st), Some(0), "{out}");
    assert!(
        out.contains("pid=2\n"),
        "first process is pid 2 after the cell init: {out}"
    );
    assert!(out.contains("host=probe\n"), "own hostname: {out}");
    assert!(
        out.contains("0::/\n"),
        "own cgroup namespace rooted at the cell: {out}"
    );
    assert!(out.contains("net=lo\n"), "only lo: {out}");
    assert!(out.contains("loflags=0x9\n"), "lo is up: {out}");
    assert!(
        out.contains("init=aurae-init\n"),
        "pid 1 is the cell init: {out}"
    );
    // The shell's own descriptors, listed by a child so no directory fd of the lister counts.
    run(&c, sh("probe", "fds", "ls /proc/$$/fd")).await;
    wait(&c, "probe", "fds").await;
    assert_eq!(
        output(&c, "probe", "fds").await,
        "0\n1\n2\n",
        "only stdio crosses into a workload"
    );
    let host_net = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert!(
        !out.contains(&format!("netns={}", host_net.display())),
        "a new network namespace: {out}"
    );
    // The init gives back the code pages of its set-up once it has reported (the script
    // waits up to 2 s for it): its binary's resident pages (a sealed copy of auraed: shmem)
    // are then the wait loop's few (4.2 MiB in a debug build before, 0.5 after).
    let init_shmem_kib: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("RssShmem: "))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(
        init_shmem_kib <= 2048,
        "the cell init's binary pages: {out}"
    );
    let maxpid: u32 = out
        .lines()
        .find_map(|l| l.strip_prefix("maxpid="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        maxpid < 100,
        "only the cell's own few pids are visible: {out}"
    );
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_of_a_cell_talk_over_localhost() {
    let Some((_d, c)) = daemon(
        "two_processes_of_a_cell_talk_over_localhost",
        DaemonOptions::default(),
    )
    .await
    else {
        return;
    };
    allocate(&c, "pair").await;
    let server = "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                  s.bind(('127.0.0.1', 7001))\ns.listen()\nc,_=s.accept()\nprint(c.recv(100).decode(), flush=True)\nc.sendall(b'pong')";
    let client = "import socket,time\nfor i in range(200):\n    try:\n        s=socket.create_connection(('127.0.0.1', 7001))\n        break\n    except OSError:\n        time.sleep(0.05)\n\
                  s.sendall(b'ping')\nprint(s.recv(100).decode(), flush=True)";
    run(
        &c,
        exe("pair", "server", &["/usr/bin/python3", "-c", server]),
    )
    .await;
    run(
        &c,
        exe("pair", "client", &["/usr/bin/python3", "-c", client]),
    )
    .await;
    let (s, cl) = (
        wait(&c, "pair", "server").await,
        wait(&c, "pair", "client").await,
    );
    let (so, co) = (
        output(&c, "pair", "server").await,
        output(&c, "pair", "client").await,
    );
    assert_eq!(
        (code(&s), code(&cl)),
        (Some(0), Some(0)),
        "server: {so} client: {co}"
    );
    assert_eq!((so.trim(), co.trim()), ("ping", "pong"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_are_placed_frozen_and_killed_with_their_cell() {
    let Some((d, c)) = daemon(
        "processes_are_placed_frozen_and_killed_with_their_cell",
        DaemonOptions::default(),
    )
    .await
    else {
        return;
    };
    allocate(&c, "place").await;
    let st = run(&c, exe("place", "sleeper", &["/bin/sleep", "100"])).await;
    let cg = d.cgroup.clone().unwrap().join("place");
    let procs = std::fs::read_to_string(format!("/proc/{}/cgroup", st.pid)).unwrap();
    let rel = cg.strip_prefix(tier::cgroup_parent().unwrap()).unwrap();
    assert!(
        procs.contains(&format!("0::/{}/_procs", rel.display())),
        "{procs}"
    );
    std::fs::write(cg.join("cgroup.freeze"), "1").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(cg.join("cgroup.events"))
        .unwrap()
        .contains("frozen 1")
    {
        assert!(Instant::now() < deadline, "cell did not freeze");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    std::fs::write(cg.join("cgroup.freeze"), "0").unwrap();
    let stopped = c
        .cells()
        .stop(pb::StopRequest {
            name: "place".into(),
            grace_period: Some(prost_types::Duration {
                seconds: 2,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.phase, pb::Phase::Exited as i32);
    let s = wait(&c, "place", "sleeper").await;
    assert_eq!(signal(&s), Some(15), "sleep ends by SIGTERM: {s:?}");
    assert!(
        !std::fs::read_to_string(cg.join("cgroup.events"))
            .unwrap()
            .contains("populated 1")
    );
    c.cells()
        .free(pb::NameRef {
            name: "place".into(),
        })
        .await
        .unwrap();
    assert!(!cg.exists(), "free removes the cgroup");
    let e = c
        .cells()
        .get(pb::NameRef {
            name: "place".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_signals_and_graceful_stop() {
    let Some((_d, c)) = daemon(
        "exit_codes_signals_and_graceful_stop",
        DaemonOptions::default(),
    )
    .await
    else {
        return;
    };
    allocate(&c, "codes").await;
    for (name, script, want_code, want_sig) in [
        ("zero", "exit 0", Some(0), None),
        ("three", "exit 3", Some(3), None),
        ("max", "exit 255", Some(255), None),
        ("killed", "kill -KILL $$", None, Some(9)),
        ("termed", "kill -TERM $$", None, Some(15)),
    ] {
        run(&c, sh("codes", name, script)).await;
        let s = wait(&c, "codes", name).await;
        assert_eq!(
            (code(&s), signal(&s)),
            (want_code, want_sig),
            "{name}: {s:?}"
        );
        assert_eq!(s.pid, 0, "an exited executable has no pid");
    }
    // Graceful: the process handles SIGTERM and exits 0 within the grace period.
    run(
        &c,
        sh(
            "codes",
            "polite",
            "trap 'echo bye; exit 0' TERM; while true; do sleep 0.05; done",
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = c
        .executables()
        .stop(pb::StopExecutableRequest {
            executable: Some(r("codes", "polite")),
            grace_period: Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&s), Some(0), "{s:?}");
    assert!(output(&c, "codes", "polite").await.contains("bye"));
    // Stubborn: SIGTERM ignored, SIGKILL after the grace period.
    run(
        &c,
        sh(
            "codes",
            "stubborn",
            "trap '' TERM; while true; do sleep 0.05; done",
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let s = c
        .executables()
        .stop(pb::StopExecutableRequest {
            executable: Some(r("codes", "stubborn")),
            grace_period: Some(prost_types::Duration {
                seconds: 0,
                nanos: 500_000_000,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(signal(&s), Some(9), "{s:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "waited the grace period"
    );
    // Signalling an exited process signals nobody.
    let e = c
        .executables()
        .signal(pb::SignalExecutableRequest {
            executable: Some(r("codes", "zero")),
            signal: 15,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_replay_and_follow() {
    let Some((_d, c)) = daemon("logs_replay_and_follow", DaemonOptions::default()).await else {
        return;
    };
    allocate(&c, "logs").await;
    run(
        &c,
        sh(
            "logs",
            "talker",
            "for i in 1 2 3 4 5; do echo line$i; sleep 0.1; done; echo oops >&2",
        ),
    )
    .await;
    // Follow from the start while it runs: every line arrives, then the stream ends.
    let mut s = c
        .executables()
        .logs(pb::ExecutableLogsRequest {
            executable: Some(r("logs", "talker")),
            follow: true,
            from_offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut stdout = String::new();
    let mut stderr = String::new();
    let mut chunks = 0;
    while let Some(ch) = tokio::time::timeout(Duration::from_secs(20), s.message())
        .await
        .unwrap()
        .unwrap()
    {
        chunks += 1;
        let text = String::from_utf8_lossy(&ch.data).into_owned();
        if ch.stream == pb::LogStream::Stderr as i32 {
            stderr += &text
        } else {
            stdout += &text
        }
    }
    assert_eq!(stdout, "line1\nline2\nline3\nline4\nline5\n");
    assert_eq!(stderr, "oops\n");
    assert!(chunks >= 2, "followed live, in several chunks ({chunks})");
    // Replay from an offset after the fact.
    let mut s = c
        .executables()
        .logs(pb::ExecutableLogsRequest {
            executable: Some(r("logs", "talker")),
            follow: false,
            from_offset: 6,
        })
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap();
    assert_eq!(first.offset, 6);
    assert!(String::from_utf8_lossy(&first.data).starts_with("line2"));
}

fn zombies_of(parents: &[i32]) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.first() == Some(&"Z")
            && f.get(1)
                .and_then(|p| p.parse::<i32>().ok())
                .is_some_and(|p| parents.contains(&p))
        {
            out.push(stat);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_short_executables_with_double_forks_leave_no_zombies() {
    let Some((d, c)) = daemon(
        "a_thousand_short_executables_with_double_forks_leave_no_zombies",
        DaemonOptions::default(),
    )
    .await
    else {
        return;
    };
    let cell = allocate(&c, "many").await;
    let init = cell.executables.len(); // 0; the init pid comes from the host view below
    assert_eq!(init, 0);
    let auraed = i32::try_from(d.pid().unwrap()).unwrap();
    // Also a cell sharing auraed's PID namespace: its orphans come to auraed, the subreaper.
    c.cells()
        .allocate(pb::Cell {
            name: "hostpid".into(),
            namespaces: Some(pb::CellNamespaces {
                share_host_pid: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let start = Instant::now();
    let n = 1000usize;
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut wrong = Vec::new();
            for i in (worker..n).step_by(8) {
                let cell = if i % 2 == 0 { "many" } else { "hostpid" };
                let code = i32::try_from(i % 256).unwrap();
                let script = if i % 10 == 0 {
                    format!("(sleep 0.01 &) ; exit {code}")
                } else {
                    format!("exit {code}")
                };
                let name = format!("e{i}");
                run(&c, sh(cell, &name, &script)).await;
                let s = wait(&c, cell, &name).await;
                if super_code(&s) != Some(code) {
                    wrong.push(format!("{name}: {s:?}"));
                }
                c.executables().free(r(cell, &name)).await.unwrap();
            }
            wrong
        }));
    }
    let mut wrong = Vec::new();
    for t in tasks {
        wrong.extend(t.await.unwrap());
    }
    // Let the orphaned sleeps finish and be reaped.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let zombies = zombies_of(&[auraed]);
    println!(
        "{n} executables (every 10th double-forking, half sharing auraed's pid namespace) in {:.2} s: {} wrong exit codes, {} zombies",
        start.elapsed().as_secs_f64(),
        wrong.len(),
        zombies.len()
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(zombies.is_empty(), "zombies left: {zombies:?}");
}

fn super_code(s: &pb::ExecutableStatus) -> Option<i32> {
    code(s)
}

fn threads_of(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_lifecycles_leak_no_fds_or_threads() {
    let Some((d, c)) = daemon(
        "five_hundred_lifecycles_leak_no_fds_or_threads",
        DaemonOptions::default(),
    )
    .await
    else {
        return;
    };
    let cycle = |i: usize| {
        let c = c.clone();
        async move {
            let name = format!("cycle{i}");
            c.cells()
                .allocate(pb::Cell {
                    name: name.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
            run(&c, exe(&name, "t", &["/bin/true"])).await;
            assert_eq!(code(&wait(&c, &name, "t").await), Some(0));
            output(&c, &name, "t").await;
            c.cells().free(pb::NameRef { name }).await.unwrap();
        }
    };
    for i in 0..20 {
        cycle(i).await; // warm up pools and lazily made state
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = d.pid().unwrap();
    let (fds0, threads0) = (d.fd_count().unwrap(), threads_of(pid));
    let start = Instant::now();
    for i in 20..520 {
        cycle(i).await;
    }
    let took = start.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (fds1, threads1) = (d.fd_count().unwrap(), threads_of(pid));
    println!(
        "500 cell+executable lifecycles in {:.2} s ({:.1} ms each): fds {fds0} -> {fds1}, threads {threads0} -> {threads1}",
        took.as_secs_f64(),
        took.as_secs_f64() * 1e3 / 500.0
    );
    assert_eq!(fds1, fds0, "fd leak");
    assert!(
        threads1 <= threads0 + 2, // the blocking pool may keep one more idle thread; a leak would add ~500
        "thread leak: {threads0} -> {threads1}"
    );
    // Only the pool of spare inits' own group stays (removed when auraed stops).
    let left: Vec<_> = std::fs::read_dir(d.cgroup.as_ref().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir() && e.file_name() != "cell-pool")
        .collect();
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeing_a_forking_cell_empties_it_quickly() {
    let Some((d, c)) = daemon(
        "freeing_a_forking_cell_empties_it_quickly",
        DaemonOptions::default(),
    )
    .await
    else {
        return;
    };
    allocate(&c, "forker").await;
    run(&c, sh("forker", "loop", "while true; do sleep 30 & done")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cg = d.cgroup.clone().unwrap().join("forker");
    let procs = std::fs::read_to_string(cg.join("_procs/cgroup.procs"))
        .unwrap()
        .lines()
        .count();
    let t = Instant::now();
    c.cells()
        .free(pb::NameRef {
            name: "forker".into(),
        })
        .await
        .unwrap();
    let took = t.elapsed();
    println!(
        "freed a forking cell with {procs} processes in {:.1} ms",
        took.as_secs_f64() * 1e3
    );
    assert!(procs > 10, "the loop forked ({procs})");
    assert!(!cg.exists(), "directory removed");
    assert!(took < Duration::from_secs(5), "free took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_cells_live_inside_their_parent_and_are_freed_with_it() {
    let Some((d, c)) = daemon(
        "nested_cells_live_inside_their_parent_and_are_freed_with_it",
        DaemonOptions::default(),
    )
    .await
    else {
        return;
    };
    let e = c
        .cells()
        .allocate(pb::Cell {
            name: "web/api".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    allocate(&c, "web").await;
    allocate(&c, "web/api").await;
    let inner = run(&c, exe("web/api", "sleeper", &["/bin/sleep", "30"])).await;
    let host_view = std::fs::read_to_string(format!("/proc/{}/cgroup", inner.pid)).unwrap();
    assert!(host_view.contains("/web/api/_procs"), "{host_view}");
    run(
        &c,
        sh(
            "web/api",
            "me",
            "grep '^0::' /proc/self/cgroup; echo pid=$$; hostname",
        ),
    )
    .await;
    wait(&c, "web/api", "me").await;
    let me = output(&c, "web/api", "me").await;
    assert!(me.contains("0::/\n") && me.contains("\napi\n"), "{me}");
    // The parent's processes see the child's: its PID namespace is nested inside.
    run(&c, sh("web", "look", "ls /proc | grep -c '^[0-9]'")).await;
    wait(&c, "web", "look").await;
    let seen: usize = output(&c, "web", "look").await.trim().parse().unwrap();
    assert!(
        seen >= 4,
        "parent sees its init, the child's init and sleeper, and itself: {seen}"
    );
    c.cells()
        .free(pb::NameRef { name: "web".into() })
        .await
        .unwrap();
    assert!(!d.cgroup.as_ref().unwrap().join("web").exists());
    let e = c
        .cells()
        .get(pb::NameRef {
            name: "web/api".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cell_requests_get_precise_errors() {
    let policy = format!(
        "[[grant]]\nid = \"spiffe://{td}/operator/admin\"\nmethods = [\"*\"]\nnames = [\"*\"]\nallow_uid_zero = true\nallow_host_namespaces = true\n\n\
         [[grant]]\nid = \"spiffe://{td}/operator/alice\"\nmethods = [\"*\"]\nnames = [\"team-a\"]\nuids = [\"65534\"]\ngids = [\"65534\"]\n",
        td = aurae_testkit::TRUST_DOMAIN
    );
    let Some((d, c)) = daemon(
        "bad_cell_requests_get_precise_errors",
        DaemonOptions {
            policy: Some(policy),
            ..Default::default()
        },
    )
    .await
    else {
        return;
    };
    let code_of = |r: Result<tonic::Response<pb::ExecutableStatus>, tonic::Status>| r.unwrap_err();
    let e = code_of(
        c.runtime()
            .run_executable(exe("nope", "x", &["/bin/true"]))
            .await,
    );
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("allocate it first"), "{}", e.message());
    allocate(&c, "team-a").await;
    let e = c
        .cells()
        .allocate(pb::Cell {
            name: "team-a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let e = code_of(
        c.runtime()
            .run_executable(exe("team-a", "x", &["/no/such/binary"]))
            .await,
    );
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("argv[0]"), "{}", e.message());
    let e = code_of(
        c.runtime()
            .run_executable(pb::Executable {
                working_dir: "/no/such/dir".into(),
                ..exe("team-a", "y", &["/bin/true"])
            })
            .await,
    );
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("working_dir"), "{}", e.message());
    run(&c, exe("team-a", "dup", &["/bin/sleep", "5"])).await;
    let e = code_of(
        c.runtime()
            .run_executable(exe("team-a", "dup", &["/bin/true"]))
            .await,
    );
    assert_eq!(e.code(), Code::AlreadyExists);
    let e = c.executables().free(r("team-a", "dup")).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "running executables are not freed"
    );
    // A missing controller is named, never silently ignored.
    if tier::needs_controller("memory").is_some() {
        let e = c
            .cells()
            .allocate(pb::Cell {
                name: "limited".into(),
                limits: Some(pb::CellLimits {
                    memory_max_bytes: Some(64 << 20),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains("memory controller"), "{}", e.message());
    }
    // alice: her own prefix only; no uid 0; no host namespaces.
    let alice = d.client("alice").await.unwrap();
    let e = alice
        .runtime()
        .run_executable(exe("team-a", "root", &["/bin/true"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "no uid means root: {e:?}");
    let ok = alice
        .runtime()
        .run_executable(pb::Executable {
            uid: Some(65534),
            ..exe("team-a", "nobody", &["/usr/bin/id", "-u"])
        })
        .await
        .unwrap()
        .into_inner();
    // `id` may have exited before the reply was built.
    assert!(
        [pb::Phase::Running as i32, pb::Phase::Exited as i32].contains(&ok.phase),
        "{ok:?}"
    );
    assert_eq!(code(&wait(&c, "team-a", "nobody").await), Some(0));
    assert_eq!(output(&c, "team-a", "nobody").await.trim(), "65534");
    let e = alice
        .cells()
        .allocate(pb::Cell {
            name: "team-a/net".into(),
            namespaces: Some(pb::CellNamespaces {
                share_host_net: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = alice
        .cells()
        .allocate(pb::Cell {
            name: "team-b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Nothing else was disturbed.
    assert_eq!(
        c.cells()
            .get(pb::NameRef {
                name: "team-a".into()
            })
            .await
            .unwrap()
            .into_inner()
            .phase,
        pb::Phase::Running as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_cannot_write_the_binary_its_init_runs_from() {
    let Some((d, c)) = daemon(
        "a_workload_cannot_write_the_binary_its_init_runs_from",
        DaemonOptions::default(),
    )
    .await
    else {
        return;
    };
    let bin = Path::new(env!("CARGO_BIN_EXE_auraed"));
    let before = std::fs::read(bin).unwrap();
    allocate(&c, "evil").await;
    run(
        &c,
        sh(
            "evil",
            "w",
            "echo overwritten > /proc/1/exe && echo WROTE; readlink /proc/1/exe",
        ),
    )
    .await;
    let s = wait(&c, "evil", "w").await;
    let out = output(&c, "evil", "w").await;
    assert!(!out.contains("WROTE"), "{out}");
    assert!(
        out.contains("memfd:auraed-sealed"),
        "the init runs from the sealed memfd: {out}"
    );
    assert_eq!(code(&s), Some(0));
    assert!(
        std::fs::read(bin).unwrap() == before,
        "auraed's binary is unchanged"
    );
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_report_starts_and_exits() {
    let Some((_d, c)) = daemon("events_report_starts_and_exits", DaemonOptions::default()).await
    else {
        return;
    };
    let mut watch = c
        .events()
        .watch(pb::WatchEventsRequest {
            kinds: vec![],
            name_prefix: "ev".into(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    allocate(&c, "ev").await;
    run(&c, sh("ev", "x", "exit 4")).await;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let e = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push((e.name.clone(), e.r#type, e.exit.and_then(|x| x.how)));
    }
    assert_eq!(seen[0], ("ev".into(), pb::EventType::Created as i32, None));
    assert_eq!(seen[1].1, pb::EventType::Started as i32);
    assert_eq!(
        seen[2],
        (
            "ev/x".into(),
            pb::EventType::Exited as i32,
            Some(pb::exit_status::How::Code(4))
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_every_cell_and_leaves_nothing() {
    let Some((mut d, c)) = daemon(
        "shutdown_stops_every_cell_and_leaves_nothing",
        DaemonOptions::default(),
    )
    .await
    else {
        return;
    };
    allocate(&c, "a").await;
    allocate(&c, "a/b").await;
    let s = run(&c, exe("a/b", "s", &["/bin/sleep", "60"])).await;
    let status = d
        .terminate(Duration::from_secs(20))
        .unwrap()
        .expect("exited");
    assert!(status.success());
    assert!(!Path::new(&format!("/proc/{}", s.pid)).exists() || zombies_of(&[s.pid]).is_empty());
    // auraed made its cgroup root, so it removes it again once every cell is gone.
    let root = d.cgroup.clone().unwrap();
    assert!(
        !root.exists(),
        "cgroup root left after shutdown: {:?}",
        std::fs::read_dir(&root).map(|r| r.count())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_environment_and_process_stats() {
    let Some((_d, c)) = daemon(
        "stdin_environment_and_process_stats",
        DaemonOptions::default(),
    )
    .await
    else {
        return;
    };
    allocate(&c, "io").await;
    let mut e = sh(
        "io",
        "reader",
        "read x; echo got=$x; echo env=$FOO; echo home=${HOME:-unset}; sleep 1",
    );
    e.stdin = b"hello\n".to_vec();
    e.env.insert("FOO".into(), "bar".into());
    run(&c, e).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = c
        .executables()
        .stats(r("io", "reader"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        stats.memory_current_bytes > 0,
        "RSS of a running process: {stats:?}"
    );
    wait(&c, "io", "reader").await;
    assert_eq!(
        output(&c, "io", "reader").await,
        "got=hello\nenv=bar\nhome=unset\n",
        "stdin given, environment exactly as asked"
    );
}

/// `argv` of a process, NUL-separated fields split.
fn argv_of(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// `PPid:` of a process.
fn ppid_of(pid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))?
        .trim()
        .parse()
        .ok()
}

/// Whether process `pid` exists and is not a zombie.
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, r)| !r.starts_with('Z'))
    })
}

/// The running (not zombie) children of `parent` that are a cell init zygote.
fn zygotes_of(parent: i32) -> Vec<i32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // (Its inits have its argv too, but their own name.)
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if running(pid)
            && comm == "aurae-zygote\n"
            && ppid_of(pid) == Some(parent)
            && argv_of(pid).get(1).map(String::as_str) == Some(auraed::cell::zygote::ZYGOTE_ARG)
        {
            found.push(pid);
        }
    }
    found
}

/// The host pid of a cell's init (its leaf holds only the init until a process starts).
fn init_of(d: &Daemon, cell: &str) -> Option<i32> {
    let procs = d
        .cgroup
        .clone()
        .unwrap()
        .join(cell)
        .join("_procs/cgroup.procs");
    std::fs::read_to_string(&procs)
        .unwrap()
        .lines()
        .next()?
        .parse()
        .ok()
}

/// Top-level cells' inits are forked by one zygote (auraed's child, its binary exec'd
/// once), born auraed's children in their cells; a nested cell's init is exec'd. The
/// zygote killed: the next init comes from a new one (or, had the death not been seen
/// yet, is exec'd: never lost); stopped: one init is exec'd after 5 s and the zygote
/// replaced. auraed killed: its zygote ends with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inits_come_from_one_zygote_that_is_replaced_and_ends_with_auraed() {
    let Some((mut d, c)) = daemon(
        "inits_come_from_one_zygote_that_is_replaced_and_ends_with_auraed",
        DaemonOptions::default(),
    )
    .await
    else {
        return;
    };
    let auraed = i32::try_from(d.pid().unwrap()).unwrap();
    for name in ["z1", "z2", "z3"] {
        allocate(&c, name).await;
    }
    let zygotes = zygotes_of(auraed);
    assert_eq!(
        zygotes.len(),
        1,
        "one zygote: {zygotes:?}; auraed's log:\n{}",
        d.log_text()
    );
    let zygote = zygotes[0];
    for name in ["z1", "z2", "z3"] {
        let init = init_of(&d, name).unwrap();
        assert_eq!(
            ppid_of(init),
            Some(auraed),
            "{name}'s init is auraed's child"
        );
        assert_eq!(argv_of(init), argv_of(zygote), "{name}'s init was forked");
        assert_eq!(
            std::fs::read_to_string(format!("/proc/{init}/comm")).unwrap(),
            "aurae-init\n"
        );
    }
    // A nested cell's init (where it has one) joins its parent's namespaces: exec'd.
    allocate(&c, "z1/inner").await;
    if let Some(inner) = init_of(&d, "z1/inner") {
        assert_eq!(
            argv_of(inner).get(1).map(String::as_str),
            Some("__aurae-cell-init"),
            "{:?}",
            argv_of(inner)
        );
    }

    // The zygote killed (and seen dead): a new one forks the next init.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(zygote),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t = Instant::now();
    while zygotes_of(auraed).contains(&zygote) && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    allocate(&c, "z4").await;
    let now = zygotes_of(auraed);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now[0], zygote, "a new zygote");
    assert_eq!(argv_of(init_of(&d, "z4").unwrap()), argv_of(now[0]));
    run(&c, sh("z4", "p", "echo pid=$$ host=$(hostname)")).await;
    assert_eq!(code(&wait(&c, "z4", "p").await), Some(0));
    assert_eq!(output(&c, "z4", "p").await, "pid=2 host=z4\n");

    // The zygote stopped (SIGSTOP): the next init is exec'd once the zygote has not
    // answered in time (5 s), the stopped one is killed, and a new one serves after.
    let stopped = now[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(stopped),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let t = Instant::now();
    allocate(&c, "z5").await;
    let took = t.elapsed();
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert_eq!(
        argv_of(init_of(&d, "z5").unwrap())
            .get(1)
            .map(String::as_str),
        Some("__aurae-cell-init"),
        "exec'd"
    );
    allocate(&c, "z6").await;
    let now = zygotes_of(auraed);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now[0], stopped, "the stopped zygote is gone");
    assert_eq!(argv_of(init_of(&d, "z6").unwrap()), argv_of(now[0]));
    assert!(d.log_text().contains("this init is exec'd"), "reported");

    // auraed killed: its zygote sees its socket end and exits.
    let last = now[0];
    d.crash_and_restart().await.unwrap();
    let t = Instant::now();
    while running(last) && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!running(last), "the zygote outlived its auraed");
    // The restarted auraed serves the cells again and forks new inits from its own.
    let c = d.client("admin").await.unwrap();
    allocate(&c, "z7").await;
    let auraed = i32::try_from(d.pid().unwrap()).unwrap();
    assert_eq!(zygotes_of(auraed).len(), 1);
    drop(d);
}

/// The network namespaces the zygote `pid` holds made ahead (its own, `home`, left out).
fn spares_held(pid: i32, home: &Path) -> Vec<std::path::PathBuf> {
    let mut held = aurae_testkit::namespaces_held(pid.unsigned_abs(), "net");
    held.retain(|n| n != home);
    held
}

/// The network namespace of the init of cell `name`.
fn init_net(d: &Daemon, name: &str) -> std::path::PathBuf {
    aurae_testkit::namespace_of(init_of(d, name).unwrap().unsigned_abs(), "net").unwrap()
}

/// A top-level cell's init is born in a network namespace its zygote made ahead (`lo`
/// up, nothing else) when it has one: each spare serves one cell and is then no longer
/// held, none is ever the host's, the zygote itself is back in auraed's namespace once it
/// has made the next spares (it steps into each only to make it); what a workload sees of its network is what a cell whose namespace was
/// made with it sees (`a_cell_has_its_own_namespaces_with_lo_up_and_only_stdio`): `lo`
/// alone, up, 127.0.0.1 and ::1 on it, nothing routed elsewhere (the first cell's init
/// was most likely asked for before the new zygote had made a spare). Freed, the cells leave
/// the zygote's spares as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cells_are_born_in_network_namespaces_made_ahead_each_used_once() {
    let Some((d, c)) = daemon(
        "cells_are_born_in_network_namespaces_made_ahead_each_used_once",
        DaemonOptions::default(),
    )
    .await
    else {
        return;
    };
    let auraed = i32::try_from(d.pid().unwrap()).unwrap();
    let host_net = aurae_testkit::namespace_of(auraed.unsigned_abs(), "net").unwrap();
    // The first init starts the zygote.
    allocate(&c, "n0").await;
    let zygote = zygotes_of(auraed)[0];
    let mut used = vec![init_net(&d, "n0")];
    for i in 1..=6 {
        // Done making spares: all held and the zygote back home. It opens a spare's fd
        // before it leaves it (`namespace_ahead`), so the count alone can be read while
        // it is still inside the last one.
        let t = Instant::now();
        let zygote_net = || aurae_testkit::namespace_of(zygote.unsigned_abs(), "net").unwrap();
        let mut spares = spares_held(zygote, &host_net);
        let mut own = zygote_net();
        while (spares.len() < auraed::cell::zygote::SPARE_NETS || own != host_net)
            && t.elapsed() < Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
            spares = spares_held(zygote, &host_net);
            own = zygote_net();
        }
        assert_eq!(
            spares.len(),
            auraed::cell::zygote::SPARE_NETS,
            "the zygote's spares: {spares:?}"
        );
        assert_eq!(
            own, host_net,
            "the zygote goes back to auraed's network namespace after making its spares"
        );
        for s in &spares {
            assert!(
                !used.contains(s),
                "a spare ({}) a cell already had",
                s.display()
            );
        }
        let name = format!("n{i}");
        allocate(&c, &name).await;
        let net = init_net(&d, &name);
        assert!(
            spares.contains(&net),
            "{name} in a spare: {} not in {spares:?}",
            net.display()
        );
        assert_ne!(net, host_net);
        assert!(!used.contains(&net), "{name} shares a namespace");
        assert!(
            !spares_held(zygote, &host_net).contains(&net),
            "the zygote still holds {name}'s namespace"
        );
        used.push(net);
    }
    let script = "ls /sys/class/net; cat /sys/class/net/lo/flags; \
                  awk '{print $1, $6}' /proc/net/if_inet6; cat /proc/net/route | wc -l; \
                  grep -c '127.0.0.1' /proc/net/fib_trie";
    for cell in ["n0", "n3"] {
        run(&c, sh(cell, "net", script)).await;
        let st = wait(&c, cell, "net").await;
        let out = output(&c, cell, "net").await;
        assert_eq!(code(&st), Some(0), "{out}");
        assert_eq!(
            out, "lo\n0x9\n00000000000000000000000000000001 lo\n1\n2\n",
            "{cell}: lo alone, up, ::1 and 127.0.0.1 on it, no route but the header"
        );
    }
    for i in 0..=6 {
        c.cells()
            .free(pb::NameRef {
                name: format!("n{i}"),
            })
            .await
            .unwrap();
    }
    let held = spares_held(zygote, &host_net);
    assert!(held.len() <= auraed::cell::zygote::SPARE_NETS, "{held:?}");
    for s in &held {
        assert!(!used.contains(s), "{}", s.display());
    }
    drop(d);
}
