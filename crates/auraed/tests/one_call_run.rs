//! Host tier (T1): the one-call run (`RunOptions` of RunExecutable and RunCell). With
//! `wait`, `remove` and `output`, one call starts a process, returns its exit and output,
//! and leaves nothing behind; without `wait`, `remove` frees at the end (free on exit).
//! What the call made is freed however the call ends (a timeout, a caller gone), never
//! what someone else made under the same name; bad options are INVALID_ARGUMENT naming
//! the field.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{path::Path, time::Duration};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    Daemon, DaemonOptions,
    tier::{self, Tier},
};
use tonic::Code;

async fn daemon(test: &str) -> Option<(Daemon, Client)> {
    if !tier::check(test, Tier::Host, tier::needs_cells()) {
        return None;
    }
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions::default(),
    )
    .await
    .unwrap();
    let c = d.client("admin").await.unwrap();
    Some((d, c))
}

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

fn run(wait: bool, remove: bool, output: bool, timeout_ms: Option<i32>) -> Option<pb::RunOptions> {
    Some(pb::RunOptions {
        wait,
        remove,
        output,
        timeout: timeout_ms.map(|ms| prost_types::Duration {
            seconds: 0,
            nanos: ms * 1_000_000,
        }),
    })
}

fn plain_cell(name: &str, script: &str, run: Option<pb::RunOptions>) -> pb::Cell {
    pb::Cell {
        name: name.into(),
        executable: Some(pb::Executable {
            name: "job".into(),
            argv: sh(script),
            ..Default::default()
        }),
        run,
        ..Default::default()
    }
}

/// Starts a one-call cell in the background (`remove` freeing it at its end, or not).
async fn start_cell(c: &Client, name: &str, script: &str, remove: bool) {
    c.runtime()
        .run_cell(plain_cell(name, script, run(false, remove, false, None)))
        .await
        .unwrap();
}

/// Allocates a cell with no options.
async fn allocate(c: &Client, name: &str) {
    c.cells()
        .allocate(pb::Cell {
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

fn stream_text(out: &[pb::LogChunk], stream: pb::LogStream) -> String {
    String::from_utf8_lossy(
        &out.iter()
            .filter(|c| c.stream == stream as i32)
            .flat_map(|c| c.data.clone())
            .collect::<Vec<u8>>(),
    )
    .into_owned()
}

fn code(s: &pb::ExecutableStatus) -> Option<i32> {
    match s.exit.as_ref()?.how? {
        pb::exit_status::How::Code(c) => Some(c),
        pb::exit_status::How::Signal(_) => None,
    }
}

async fn cell_exists(c: &Client, name: &str) -> bool {
    match c.cells().get(pb::NameRef { name: name.into() }).await {
        Ok(_) => true,
        Err(e) if e.code() == Code::NotFound => false,
        Err(e) => panic!("{e:?}"),
    }
}

async fn gone_within(c: &Client, name: &str, t: Duration) -> bool {
    let end = std::time::Instant::now() + t;
    while std::time::Instant::now() < end {
        if !cell_exists(c, name).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_returns_exit_and_output_and_leaves_nothing() {
    let Some((d, c)) = daemon("one_call_returns_exit_and_output_and_leaves_nothing").await else {
        return;
    };
    let root = d.cgroup.clone().unwrap();
    // RunCell of a plain process: a new cell, its exit and output, the cell gone.
    let st = c
        .runtime()
        .run_cell(plain_cell(
            "job1",
            "echo out; echo err >&2; hostname; exit 3",
            run(true, true, true, None),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.phase, pb::Phase::Exited as i32, "{st:?}");
    let exe = &st.executables[0];
    assert_eq!(exe.name, "job");
    assert_eq!(code(exe), Some(3), "{exe:?}");
    assert_eq!(
        stream_text(&exe.output, pb::LogStream::Stdout),
        "out\njob1\n"
    );
    assert_eq!(stream_text(&exe.output, pb::LogStream::Stderr), "err\n");
    assert!(!cell_exists(&c, "job1").await, "removed before the reply");
    assert!(!root.join("job1").exists(), "its cgroup too");
    assert!(!d.dir.path().join("state/store/cell/job1.json").exists());
    // RunExecutable in an existing cell: the executable goes, the cell stays.
    allocate(&c, "keep").await;
    let st = c
        .runtime()
        .run_executable(pb::Executable {
            cell: "keep".into(),
            name: "once".into(),
            argv: sh("printf 'a%.0s' $(seq 1 5000)"),
            run: run(true, true, true, None),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&st), Some(0));
    assert_eq!(
        stream_text(&st.output, pb::LogStream::Stdout),
        "a".repeat(5000)
    );
    let e = c
        .executables()
        .get(aurae_testkit::workload::exe_ref("keep", "once"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(cell_exists(&c, "keep").await);
    // wait without remove or output: the exit, no output, still there to read.
    let st = c
        .runtime()
        .run_executable(pb::Executable {
            cell: "keep".into(),
            name: "kept".into(),
            argv: sh("echo kept; exit 7"),
            run: run(true, false, false, None),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&st), Some(7));
    assert!(st.output.is_empty());
    assert_eq!(
        aurae_testkit::workload::output(&c, "keep", "kept")
            .await
            .unwrap(),
        "kept\n"
    );
    // More output than the bounded memory keeps (1 MiB): what is missing is said once,
    // on the first chunk after the cut, in the reply and in Logs (which read it in one
    // batch of many chunks), and data plus `dropped` add up to all that was written.
    let written: u64 = 1_500_000;
    let st = c
        .runtime()
        .run_executable(pb::Executable {
            cell: "keep".into(),
            name: "big".into(),
            argv: sh(&format!("head -c {written} /dev/zero | tr '\\0' a")),
            run: run(true, false, true, None),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&st), Some(0));
    let mut logs = c
        .executables()
        .logs(pb::ExecutableLogsRequest {
            executable: Some(aurae_testkit::workload::exe_ref("keep", "big")),
            follow: false,
            from_offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut streamed = Vec::new();
    while let Some(chunk) = logs.message().await.unwrap() {
        streamed.push(chunk);
    }
    for (what, chunks) in [("reply", &st.output), ("Logs", &streamed)] {
        assert!(chunks.len() > 1, "{what}: {} chunks", chunks.len());
        let data: u64 = chunks.iter().map(|c| c.data.len() as u64).sum();
        let dropped: Vec<u64> = chunks.iter().map(|c| c.dropped).collect();
        assert!(
            dropped[0] > 0 && dropped[0] == chunks[0].offset,
            "{what}: {dropped:?}"
        );
        assert!(dropped[1..].iter().all(|d| *d == 0), "{what}: {dropped:?}");
        assert_eq!(data + dropped[0], written, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_frees_at_the_end_however_the_call_ends() {
    let Some((_d, c)) = daemon("remove_frees_at_the_end_however_the_call_ends").await else {
        return;
    };
    // Free on exit: the call returns at once, the cell goes when its process ends.
    let st = c
        .runtime()
        .run_cell(plain_cell("bg", "sleep 0.4", run(false, true, false, None)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.phase, pb::Phase::Running as i32);
    assert!(cell_exists(&c, "bg").await);
    assert!(
        gone_within(&c, "bg", Duration::from_secs(5)).await,
        "freed on exit"
    );
    // A wait that times out: DEADLINE_EXCEEDED naming run.timeout; it keeps running and
    // is freed at its end.
    let e = c
        .runtime()
        .run_cell(plain_cell(
            "slow",
            "sleep 1",
            run(true, true, false, Some(200)),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(e.message().contains("run.timeout"), "{}", e.message());
    assert!(
        cell_exists(&c, "slow").await,
        "still running after the timeout"
    );
    assert!(gone_within(&c, "slow", Duration::from_secs(6)).await);
    // A caller that goes away: the same.
    let mut rt = c.runtime();
    let call = rt.run_cell(plain_cell("left", "sleep 0.6", run(true, true, true, None)));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), call)
            .await
            .is_err(),
        "the call was still waiting"
    );
    assert!(cell_exists(&c, "left").await);
    assert!(gone_within(&c, "left", Duration::from_secs(6)).await);
    // Someone frees the cell and makes another with the same name before the end is
    // seen: the new one is not touched.
    start_cell(&c, "reused", "sleep 30", true).await;
    c.cells()
        .free(pb::NameRef {
            name: "reused".into(),
        })
        .await
        .unwrap();
    allocate(&c, "reused").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(cell_exists(&c, "reused").await, "another's cell was freed");
    // The same for an executable name.
    allocate(&c, "ex").await;
    let r = aurae_testkit::workload::exe_ref("ex", "w");
    c.runtime()
        .run_executable(pb::Executable {
            cell: "ex".into(),
            name: "w".into(),
            argv: sh("sleep 30"),
            run: run(false, true, false, None),
            ..Default::default()
        })
        .await
        .unwrap();
    c.executables()
        .stop(pb::StopExecutableRequest {
            executable: Some(r.clone()),
            grace_period: None,
        })
        .await
        .unwrap();
    // Freed at its end by run.remove.
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while c.executables().get(r.clone()).await.is_ok() && std::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        c.executables().get(r.clone()).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_run_options_name_the_field() {
    let Some((_d, c)) = daemon("bad_run_options_name_the_field").await else {
        return;
    };
    let cases: Vec<(pb::Cell, &str)> = vec![
        (
            plain_cell("a", "true", run(false, true, true, None)),
            "run.output",
        ),
        (
            plain_cell("a", "true", run(false, false, false, Some(100))),
            "run.timeout",
        ),
        (
            pb::Cell {
                run: Some(pb::RunOptions {
                    wait: true,
                    timeout: Some(prost_types::Duration {
                        seconds: 3600,
                        nanos: 0,
                    }),
                    ..Default::default()
                }),
                ..plain_cell("a", "true", None)
            },
            "run.timeout",
        ),
        (
            pb::Cell {
                container: Some(pb::Container {
                    image: "x/y:z".into(),
                    ..Default::default()
                }),
                ..plain_cell("a", "true", None)
            },
            "executable",
        ),
        (
            pb::Cell {
                executable: Some(pb::Executable {
                    cell: "other".into(),
                    argv: sh("true"),
                    ..Default::default()
                }),
                ..plain_cell("a", "true", None)
            },
            "executable.cell",
        ),
        (
            pb::Cell {
                executable: Some(pb::Executable::default()),
                ..plain_cell("a", "true", None)
            },
            "executable.argv",
        ),
        (
            pb::Cell {
                executable: Some(pb::Executable {
                    argv: sh("true"),
                    run: run(true, false, false, None),
                    ..Default::default()
                }),
                ..plain_cell("a", "true", None)
            },
            "executable.run",
        ),
    ];
    for (cell, field) in cases {
        let e = c.runtime().run_cell(cell).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
    for (cell, field) in [
        (plain_cell("a", "true", None), "executable"),
        (
            pb::Cell {
                name: "a".into(),
                run: run(true, true, false, None),
                ..Default::default()
            },
            "run",
        ),
    ] {
        let e = c.cells().allocate(cell).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with(field), "{}", e.message());
    }
    let e = c
        .runtime()
        .run_executable(pb::Executable {
            cell: "nope".into(),
            argv: sh("true"),
            run: run(false, false, true, None),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("run.output"), "{}", e.message());
    // Nothing was made by any of them.
    assert!(!cell_exists(&c, "a").await);
}

/// Eight clients running one-call cells at once while two more fight over one name
/// (allocate, free, allocate…): every run exits 0, the fight ends with the name either
/// free or one cell, and nothing else is left (cgroups, records).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_at_once_leave_nothing() {
    let Some((d, c)) = daemon("many_clients_at_once_leave_nothing").await else {
        return;
    };
    let mut tasks = Vec::new();
    for k in 0..8 {
        let c = d.client("admin").await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..12 {
                let st = c
                    .runtime()
                    .run_cell(plain_cell(
                        &format!("w{k}-{i}"),
                        "echo $(hostname)",
                        run(true, true, true, None),
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                let e = &st.executables[0];
                assert_eq!(
                    stream_text(&e.output, pb::LogStream::Stdout),
                    format!("w{k}-{i}\n")
                );
                ok += usize::from(code(e) == Some(0));
            }
            ok
        }));
    }
    let mut fights = Vec::new();
    for _ in 0..2 {
        let c = d.client("admin").await.unwrap();
        fights.push(tokio::spawn(async move {
            for _ in 0..20 {
                let _ = c
                    .cells()
                    .allocate(pb::Cell {
                        name: "contested".into(),
                        ..Default::default()
                    })
                    .await;
                let _ = c
                    .cells()
                    .free(pb::NameRef {
                        name: "contested".into(),
                    })
                    .await;
            }
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    for f in fights {
        f.await.unwrap();
    }
    assert_eq!(ok, 96, "every run exited 0");
    let left: Vec<String> = c
        .cells()
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cells
        .into_iter()
        .map(|c| c.name)
        .filter(|n| n != "contested")
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let _ = c
        .cells()
        .free(pb::NameRef {
            name: "contested".into(),
        })
        .await;
    let root = d.cgroup.clone().unwrap();
    let dirs: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir() && e.file_name() != "cell-pool")
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(dirs.is_empty(), "cgroups left: {dirs:?}");
    let records = std::fs::read_dir(d.dir.path().join("state/store/cell"))
        .map(|r| r.count())
        .unwrap_or(0);
    assert_eq!(records, 0, "cell records left");
}

/// `remove` survives a crash of auraed: what a run call asked to free is recorded, and the
/// restarted auraed frees it at its end — also when it ended while auraed was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_is_done_by_a_restarted_auraed() {
    let Some((mut d, c)) = daemon("remove_is_done_by_a_restarted_auraed").await else {
        return;
    };
    allocate(&c, "keep").await;
    // Ended before the crash, its free waiting for output a child still holds open: an
    // executable freed at its end has no exit record, and the restarted auraed frees it.
    c.runtime()
        .run_executable(pb::Executable {
            cell: "keep".into(),
            name: "settling".into(),
            argv: sh("sleep 6 & exit 3"),
            run: run(false, true, false, None),
            ..Default::default()
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let settling = aurae_testkit::workload::exe_ref("keep", "settling");
    let s = aurae_testkit::workload::status(&c, "keep", "settling")
        .await
        .unwrap();
    assert_eq!(code(&s), Some(3), "ended, its free waiting for its output");
    // Ends after the restart: a cell, and an executable in a kept cell.
    start_cell(&c, "later", "sleep 2", true).await;
    c.runtime()
        .run_executable(pb::Executable {
            cell: "keep".into(),
            name: "later".into(),
            argv: sh("sleep 2"),
            run: run(false, true, false, None),
            ..Default::default()
        })
        .await
        .unwrap();
    // Ends while auraed is down.
    start_cell(&c, "down", "sleep 0.3", true).await;
    // One with a nested cell: freed whole once the restarted auraed has both back.
    start_cell(&c, "parent", "sleep 0.3", true).await;
    allocate(&c, "parent/kid").await;
    // A plain one without remove: kept.
    start_cell(&c, "plain", "sleep 0.3", false).await;
    drop(c);
    d.crash_and_restart_after(Duration::from_secs(1))
        .await
        .unwrap();
    let c = d.client("admin").await.unwrap();
    // Its end is known as it was (its free waits up to 2 s for the output to settle): not
    // taken as ended while auraed was down, without a status.
    let s = aurae_testkit::workload::status(&c, "keep", "settling")
        .await
        .unwrap();
    assert_eq!(code(&s), Some(3), "its exit kept across the crash: {s:?}");
    assert!(
        gone_within(&c, "down", Duration::from_secs(5)).await,
        "ended while down"
    );
    assert!(
        gone_within(&c, "parent", Duration::from_secs(5)).await,
        "with its child"
    );
    assert!(!cell_exists(&c, "parent/kid").await);
    assert!(
        cell_exists(&c, "later").await,
        "still running after the restart"
    );
    assert!(
        gone_within(&c, "later", Duration::from_secs(8)).await,
        "freed at its end"
    );
    let r = aurae_testkit::workload::exe_ref("keep", "later");
    let end = std::time::Instant::now() + Duration::from_secs(8);
    while c.executables().get(r.clone()).await.is_ok() && std::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        c.executables().get(r).await.unwrap_err().code(),
        Code::NotFound
    );
    // Once its output settles (the child holding it keeps running).
    let end = std::time::Instant::now() + Duration::from_secs(8);
    while c.executables().get(settling.clone()).await.is_ok() && std::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        c.executables().get(settling).await.unwrap_err().code(),
        Code::NotFound,
        "ended before the crash: freed by the restarted auraed"
    );
    assert!(cell_exists(&c, "keep").await);
    assert!(cell_exists(&c, "plain").await, "no remove asked: kept");
}

/// Calls cut off by the caller at any moment (1–20 ms deadlines) leave nothing half made:
/// a one-call `remove` run is gone at its end, and every cell an allocation made is listed
/// (its cgroup is a listed cell's), so nothing is left that nobody can see or free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_cut_off_at_any_moment_leave_nothing_half_made() {
    let Some((d, c)) = daemon("calls_cut_off_at_any_moment_leave_nothing_half_made").await else {
        return;
    };
    for i in 0..30u64 {
        let cut = Duration::from_millis(1 + i % 20);
        let mut rt = c.runtime();
        let _ = tokio::time::timeout(
            cut,
            rt.run_cell(plain_cell(
                &format!("r{i}"),
                "true",
                run(true, true, true, None),
            )),
        )
        .await;
        let mut cells = c.cells();
        let _ = tokio::time::timeout(
            cut,
            cells.allocate(pb::Cell {
                name: format!("a{i}"),
                ..Default::default()
            }),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let listed: Vec<String> = c
        .cells()
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cells
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert!(
        listed.iter().all(|n| n.starts_with('a')),
        "one-call cells left: {listed:?}"
    );
    let root = d.cgroup.clone().unwrap();
    let mut dirs: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir() && e.file_name() != "cell-pool")
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(dirs, sorted, "a cgroup nobody lists");
    // Every name is usable: a listed one frees, an unlisted one allocates.
    for i in 0..30 {
        let name = format!("a{i}");
        if listed.contains(&name) {
            c.cells().free(pb::NameRef { name }).await.unwrap();
        } else {
            c.cells()
                .allocate(pb::Cell {
                    name,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
}

/// Copies of pipes the output holder keeps: its open fds (numbers ≥ 4; 0–2 are
/// /dev/null, 3 its control socket).
fn held_by(holder: i32) -> usize {
    std::fs::read_dir(format!("/proc/{holder}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) >= Some(4))
        .count()
}

/// The holder is handed a start's pipes while the process starts: a start that fails
/// (exec refused in the child) gives them back, so do one-call runs once they end; what
/// still runs keeps its two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holder_keeps_nothing_of_failed_or_finished_starts() {
    let Some((d, c)) = daemon("the_holder_keeps_nothing_of_failed_or_finished_starts").await else {
        return;
    };
    allocate(&c, "held").await;
    let holder = aurae_testkit::holder_of(d.pid().unwrap()).expect("auraed runs a holder");
    let before = held_by(holder);
    c.runtime()
        .run_executable(pb::Executable {
            cell: "held".into(),
            name: "runs".into(),
            argv: vec!["/bin/sleep".into(), "60".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        held_by(holder),
        before + 2,
        "a running process's stdout and stderr"
    );
    // Exec refused in the child: not executable, a directory, a missing interpreter.
    let script = std::env::temp_dir().join(format!("aurae-noexec-{}", std::process::id()));
    std::fs::write(&script, "#!/nonexistent/interpreter\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let bad = ["/etc/hostname", "/tmp", script.to_str().unwrap()];
    for (i, prog) in bad.iter().cycle().take(12).enumerate() {
        let r = c
            .runtime()
            .run_executable(pb::Executable {
                cell: "held".into(),
                name: format!("bad{i}"),
                argv: vec![(*prog).into()],
                ..Default::default()
            })
            .await;
        assert!(r.is_err(), "{prog} started: {r:?}");
    }
    for i in 0..12 {
        let r = c
            .runtime()
            .run_executable(pb::Executable {
                cell: "held".into(),
                name: format!("ok{i}"),
                argv: sh("echo out; echo err >&2"),
                run: run(true, true, true, Some(900)),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(code(&r), Some(0));
    }
    let _ = std::fs::remove_file(&script);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while held_by(holder) != before + 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        held_by(holder),
        before + 2,
        "the holder keeps only what still runs"
    );
    c.executables()
        .stop(pb::StopExecutableRequest {
            executable: Some(pb::ExecutableRef {
                cell: "held".into(),
                name: "runs".into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while held_by(holder) != before && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(held_by(holder), before, "an ended process's copies go too");
}

/// A slow link: a Unix socket at `path` that forwards to auraed's socket at `to`, passing
/// what auraed sends at once and what the client sends `late` late once `hold_after` has
/// passed since the connection was accepted (one connection).
async fn late_link(
    path: &Path,
    to: std::path::PathBuf,
    hold_after: Duration,
    late: Duration,
) -> tokio::task::JoinHandle<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let accepted = tokio::time::Instant::now();
        let server = tokio::net::UnixStream::connect(&to).await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut sr, &mut cw).await;
        });
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        tokio::spawn(async move {
            while let Some((at, bytes)) = rx.recv().await {
                if at > accepted + hold_after {
                    tokio::time::sleep_until(at + late).await;
                }
                if sw.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        });
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = cr.read(&mut buf).await {
            if n == 0
                || tx
                    .send((tokio::time::Instant::now(), buf[..n].to_vec()))
                    .is_err()
            {
                return;
            }
        }
    })
}

/// A client on a slow link keeps its call: auraed pings a connection 30 s quiet (HTTP/2
/// keepalive) and here the answer comes 15 s late, as from a client (or an auraed, a busy
/// guest's) that is slow but well. A one-call run of 50 s on that connection returns its
/// exit; auraed does not close the connection under it (it did with a 10 s answer time:
/// a guest-tier `Wait` failed "broken pipe" in CI on 2026-12-05). About 50 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_on_a_slow_link_outlives_a_late_ping_answer() {
    let Some((d, _)) = daemon("a_call_on_a_slow_link_outlives_a_late_ping_answer").await else {
        return;
    };
    let link = d.dir.path().join("slow.sock");
    let proxy = late_link(
        &link,
        d.socket.clone(),
        Duration::from_secs(3),
        Duration::from_secs(15),
    )
    .await;
    let (cert, key) = d.identity("admin").unwrap();
    let tls = aurae_identity::tls::client_config(&d.pki.ca_cert, &cert, &key).unwrap();
    let c = Client::connect_with(&aurae_client::Endpoint::Unix(link), "localhost", tls)
        .await
        .unwrap();
    let t = std::time::Instant::now();
    let st = c
        .runtime()
        .run_cell(plain_cell(
            "slow",
            "sleep 50; exit 7",
            run(true, true, false, None),
        ))
        .await
        .unwrap_or_else(|e| panic!("after {:?}: {e:?}", t.elapsed()))
        .into_inner();
    assert_eq!(code(&st.executables[0]), Some(7), "{st:?}");
    proxy.abort();
}
