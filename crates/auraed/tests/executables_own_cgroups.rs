//! An executable with a cgroup of its own (`Executable.limits`), host tier: its processes
//! live in `<cell>/_exe.<name>`, what it leaves running there dies with it, its limits
//! are reported, Update refuses what this host cannot apply (no controllers here: the
//! limits themselves are tested in the guest tier), and a `kill -9` of auraed neither
//! loses the group nor sweeps it: the restarted auraed still kills what it left at its
//! end and removes the group at its free.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{path::Path, time::Duration};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    Daemon, DaemonOptions,
    tier::{self, Tier},
    workload,
};

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

/// The cgroup path of `pid` (its v2 line of /proc/PID/cgroup).
fn cgroup_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .unwrap_or_default()
}

/// Waits (10 s at most) until `pid` is gone.
async fn gone(pid: i32) -> bool {
    for _ in 0..500 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The processes in cgroup `dir` (host pids), once there are `n` of them.
async fn procs(dir: &Path, n: usize) -> Vec<i32> {
    for _ in 0..500 {
        let p: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if p.len() >= n {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{} never held {n} processes", dir.display());
}

fn with_group(cell: &str, name: &str, script: &str) -> pb::Executable {
    pb::Executable {
        cell: cell.into(),
        name: name.into(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        limits: Some(pb::CellLimits::default()),
        ..Default::default()
    }
}

async fn update(
    c: &Client,
    cell: &str,
    name: &str,
    limits: Option<pb::CellLimits>,
) -> Result<pb::ExecutableStatus, tonic::Status> {
    c.executables()
        .update(pb::UpdateExecutableRequest {
            executable: Some(workload::exe_ref(cell, name)),
            limits,
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executables_own_group_holds_its_processes_across_a_crash() {
    let test = "an_executables_own_group_holds_its_processes_across_a_crash";
    if !tier::check(test, Tier::Host, tier::needs_cells()) {
        return;
    }
    let mut d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions::default(),
    )
    .await
    .unwrap();
    let root = d.cgroup.clone().unwrap();
    let c = d.client("admin").await.unwrap();
    c.cells()
        .allocate(pb::Cell {
            name: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // It leaves a `sleep` behind in the background, and runs on.
    let script = "sleep 300 & exec sleep 300";
    let st = c
        .runtime()
        .run_executable(with_group("web", "api", script))
        .await
        .unwrap()
        .into_inner();
    let group = root.join("web/_exe.api");
    let straggler = procs(&group, 2)
        .await
        .into_iter()
        .find(|p| *p != st.pid)
        .unwrap();
    assert!(
        cgroup_of(st.pid).ends_with("/web/_exe.api"),
        "{}",
        cgroup_of(st.pid)
    );
    assert_eq!(cgroup_of(straggler), cgroup_of(st.pid));
    assert!(st.limits.is_some(), "the status says it has a group");
    // Inside, its own cgroup namespace is rooted at its group.
    let (end, out) = workload::run_to_end(&c, with_group("web", "inside", "cat /proc/self/cgroup"))
        .await
        .unwrap();
    assert_eq!(
        end.exit.and_then(|e| e.how),
        Some(pb::exit_status::How::Code(0))
    );
    // The cgroup v2 line (a host may have v1 hierarchies too).
    assert_eq!(
        out.lines().find(|l| l.starts_with("0::")),
        Some("0::/"),
        "{out}"
    );
    // Its stats come from its group (cpu.stat is there without any controller).
    c.executables()
        .stats(workload::exe_ref("web", "api"))
        .await
        .unwrap();
    // What this host cannot apply is refused naming the field and the controller; the
    // executable runs on.
    let err = update(
        &c,
        "web",
        "api",
        Some(pb::CellLimits {
            memory_max_bytes: Some(64 << 20),
            ..Default::default()
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("limits.memory_max_bytes")
            && err.message().contains("memory controller"),
        "{err:?}"
    );
    let err = update(&c, "web", "api", None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("limits"), "{err:?}");
    let err = update(
        &c,
        "web",
        "api",
        Some(pb::CellLimits {
            cpuset_cpus: "3-1".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("limits.cpuset_cpus"), "{err:?}");
    // One without a group of its own has nothing to update; its processes stay in the
    // cell's leaf.
    let plain = c
        .runtime()
        .run_executable(pb::Executable {
            cell: "web".into(),
            name: "plain".into(),
            argv: vec!["/bin/sleep".into(), "300".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cgroup_of(plain.pid).ends_with("/web/_procs"));
    assert!(plain.limits.is_none());
    let err = update(&c, "web", "plain", Some(pb::CellLimits::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("no cgroup of its own"), "{err:?}");

    // A process in an own group no record explains (started, never recorded: a crash
    // in between) is swept at the restart, reported.
    let ghost = root.join("web/_exe.ghost");
    std::fs::create_dir(&ghost).unwrap();
    let mut stray = std::process::Command::new("/bin/sleep")
        .arg("300")
        .spawn()
        .unwrap();
    std::fs::write(ghost.join("cgroup.procs"), stray.id().to_string()).unwrap();

    // kill -9 of auraed: the group is neither lost nor swept as unexplained.
    d.crash_and_restart_after(Duration::from_millis(200))
        .await
        .unwrap();
    assert!(
        stray.wait().is_ok_and(|s| !s.success()),
        "the unexplained group's process was killed"
    );
    assert!(!ghost.exists(), "the unexplained group was removed");
    let c = d.client("admin").await.unwrap();
    assert!(alive(st.pid) && alive(straggler));
    assert!(
        group.is_dir(),
        "the re-adopted executable's group was swept"
    );
    let info = c
        .daemon()
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let swept: Vec<&String> = info
        .warnings
        .iter()
        .filter(|w| w.contains("_exe"))
        .collect();
    assert!(
        swept.len() == 1 && swept[0].contains("web/_exe.ghost"),
        "{:?}",
        info.warnings
    );
    let again = c
        .executables()
        .get(workload::exe_ref("web", "api"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.limits.is_some(), "its group is recorded");
    // Its end (a stop, seen by the restarted auraed) kills what it left in its group.
    c.executables()
        .stop(pb::StopExecutableRequest {
            executable: Some(workload::exe_ref("web", "api")),
            grace_period: None,
        })
        .await
        .unwrap();
    workload::wait(&c, "web", "api").await.unwrap();
    assert!(
        gone(straggler).await,
        "what it left in its group ({straggler}) outlived it"
    );
    assert!(
        alive(plain.pid),
        "another executable of the cell is untouched"
    );
    c.executables()
        .free(workload::exe_ref("web", "api"))
        .await
        .unwrap();
    assert!(!group.exists(), "its free removes its group");
    // The name again: a fresh group.
    let st = c
        .runtime()
        .run_executable(with_group("web", "api", "echo $$; exec sleep 300"))
        .await
        .unwrap()
        .into_inner();
    assert!(cgroup_of(st.pid).ends_with("/web/_exe.api"));
    c.cells()
        .free(pb::NameRef { name: "web".into() })
        .await
        .unwrap();
    assert!(gone(st.pid).await && gone(plain.pid).await);
    assert!(
        !root.join("web").exists(),
        "the cell's free left its cgroups"
    );
}
