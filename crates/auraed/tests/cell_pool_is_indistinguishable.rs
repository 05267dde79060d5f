//! Host tier (T1): the pool of spare cell inits (`--cell-pool`). A cell that took a spare
//! must be indistinguishable from one that started its own init — namespaces, mounts,
//! hostname, cgroup, descriptors, capabilities, what its pid 1 looks like — and never
//! shared: each spare serves one cell. A spare that died is replaced by a fresh init,
//! spares leave with a crashed auraed, and a restarted auraed rebuilds the pool.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{path::Path, time::Duration};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    Daemon, DaemonOptions,
    tier::{self, Tier},
};

async fn daemon(test: &str, pool: usize) -> Option<(Daemon, Client)> {
    if !tier::check(test, Tier::Host, tier::needs_cells()) {
        return None;
    }
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            extra_args: vec!["--cell-pool".into(), pool.to_string()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let c = d.client("admin").await.unwrap();
    Some((d, c))
}

/// The pids waiting in the pool's group.
fn spares(d: &Daemon) -> Vec<i32> {
    let procs = d
        .cgroup
        .as_ref()
        .unwrap()
        .join("cell-pool/_procs/cgroup.procs");
    std::fs::read_to_string(procs)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

async fn spares_reach(d: &Daemon, n: usize) -> Vec<i32> {
    for _ in 0..500 {
        let s = spares(d);
        if s.len() == n {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let log = d.log_text();
    let tail: Vec<&str> = log.lines().rev().take(30).collect();
    panic!(
        "the pool holds {:?}, not {n} spares; auraed's log ends:\n{}",
        spares(d),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

/// The pids in a cell's leaf.
fn cell_pids(d: &Daemon, cell: &str) -> Vec<i32> {
    let procs = d
        .cgroup
        .as_ref()
        .unwrap()
        .join(cell)
        .join("_procs/cgroup.procs");
    std::fs::read_to_string(procs)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

async fn allocate(c: &Client, name: &str) {
    c.cells()
        .allocate(pb::Cell {
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Runs `script` in `cell` and returns its output (exit 0 asserted).
async fn probe(c: &Client, cell: &str, name: &str, script: &str) -> String {
    let r = |n: &str| pb::ExecutableRef {
        cell: cell.into(),
        name: n.into(),
    };
    c.runtime()
        .run_executable(pb::Executable {
            cell: cell.into(),
            name: name.into(),
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let st = c
        .executables()
        .wait(pb::WaitExecutableRequest {
            executable: Some(r(name)),
            timeout: None,
        })
        .await
        .unwrap()
        .into_inner();
    let out = aurae_testkit::workload::output(c, cell, name)
        .await
        .unwrap();
    assert!(
        matches!(
            st.exit.and_then(|e| e.how),
            Some(pb::exit_status::How::Code(0))
        ),
        "{out}"
    );
    out
}

/// What a workload can see of its cell, without numbers that differ between any two cells
/// (namespace inodes, mount ids). The cell is named "probe" in both daemons.
const SEE: &str = "echo pid=$$; echo host=$(hostname); cat /proc/self/cgroup; \
    echo net=$(ls /sys/class/net); echo lo=$(cat /sys/class/net/lo/flags); \
    echo init=$(cat /proc/1/comm); echo initcmd=$(tr '\\0' ' ' < /proc/1/cmdline); \
    echo initfds=$(ls /proc/1/fd | tr '\\n' ' '); \
    grep -E '^(Cap|NoNewPrivs|Seccomp|SigBlk|SigIgn|Uid|Gid)' /proc/1/status | sed 's/^/init /'; \
    grep -E '^(Cap|NoNewPrivs|Seccomp|Uid|Gid|Groups)' /proc/self/status; \
    echo first_pids=$(cd /proc && ls -d [0-9] | tr '\\n' ' '); \
    awk '{ print $4, $5, $6, $(NF-2), $(NF-1), $NF }' /proc/self/mountinfo; \
    echo cgroupfs=$(ls /sys/fs/cgroup | tr '\\n' ' '); \
    echo ipc=$(ls /dev/mqueue 2>/dev/null | wc -l); echo uts=$(uname -n); \
    echo limits; cat /proc/self/limits";

fn ns_of(script_out: &str) -> Vec<String> {
    script_out.lines().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_cell_is_indistinguishable_from_a_fresh_one() {
    let test = "a_pooled_cell_is_indistinguishable_from_a_fresh_one";
    let Some((fresh_d, fresh)) = daemon(test, 0).await else {
        return;
    };
    let Some((pool_d, pooled)) = daemon(test, 2).await else {
        return;
    };
    assert!(spares(&fresh_d).is_empty(), "--cell-pool 0 keeps no spares");
    let waiting = spares_reach(&pool_d, 2).await;
    allocate(&fresh, "probe").await;
    allocate(&pooled, "probe").await;
    // The pooled cell's init is one of the spares that waited (its pid), moved in.
    let init = cell_pids(&pool_d, "probe");
    assert_eq!(init.len(), 1, "{init:?}");
    assert!(
        waiting.contains(&init[0]),
        "init {init:?} not one of {waiting:?}"
    );
    let a = probe(&fresh, "probe", "see", SEE).await;
    let b = probe(&pooled, "probe", "see", SEE).await;
    println!("fresh cell sees:\n{a}");
    let (la, lb) = (ns_of(&a), ns_of(&b));
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(x, y, "fresh vs pooled differ");
    }
    assert_eq!(la.len(), lb.len(), "fresh:\n{a}\npooled:\n{b}");
    assert!(a.contains("host=probe\n") && a.contains("0::/\n") && a.contains("lo=0x9\n"));
    let initfds = a.lines().find_map(|l| l.strip_prefix("initfds=")).unwrap();
    assert_eq!(initfds.trim(), "0 1 2", "the init keeps no socket: {a}");
    // Only stdio crosses into a workload, in both.
    for c in [&fresh, &pooled] {
        assert_eq!(
            probe(c, "probe", "fds", "ls /proc/$$/fd").await,
            "0\n1\n2\n"
        );
    }
    // Host side: the init is in the cell's leaf (its cgroup namespace root), nowhere else.
    let host_cg = std::fs::read_to_string(format!("/proc/{}/cgroup", init[0])).unwrap();
    assert!(
        host_cg.trim_end().ends_with("/probe/_procs"),
        "init's cgroup {host_cg}"
    );
    // The spare was replaced.
    spares_reach(&pool_d, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spare_serves_one_cell_and_a_dead_one_is_replaced() {
    let test = "every_spare_serves_one_cell_and_a_dead_one_is_replaced";
    let Some((d, c)) = daemon(test, 2).await else {
        return;
    };
    spares_reach(&d, 2).await;
    // Ten cells in a row, faster than the pool refills: distinct inits and namespaces.
    let mut inits = Vec::new();
    let mut netns = Vec::new();
    for i in 0..10 {
        let name = format!("c{i}");
        allocate(&c, &name).await;
        inits.extend(cell_pids(&d, &name));
        let out = probe(&c, &name, "ns", "readlink /proc/self/ns/net /proc/self/ns/mnt /proc/self/ns/pid /proc/self/ns/uts /proc/self/ns/ipc /proc/self/ns/cgroup").await;
        netns.push(out);
    }
    let distinct: std::collections::BTreeSet<_> = inits.iter().collect();
    assert_eq!(distinct.len(), 10, "one init per cell: {inits:?}");
    for (i, a) in netns.iter().enumerate() {
        for b in &netns[i + 1..] {
            for (x, y) in a.lines().zip(b.lines()) {
                assert_ne!(x, y, "two cells share a namespace");
            }
        }
    }
    // Spares killed from outside: the next cell still gets a working init of its own
    // (dead spares are dropped; one that dies while taken is replaced by a fresh init, a
    // warning), and the pool refills.
    let waiting = spares_reach(&d, 2).await;
    for p in &waiting {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), nix::sys::signal::SIGKILL).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    allocate(&c, "after").await;
    let out = probe(&c, "after", "see", SEE).await;
    assert!(
        out.contains("host=after\n") && out.contains("0::/\n"),
        "{out}"
    );
    let init = cell_pids(&d, "after");
    assert_eq!(init.len(), 1);
    assert!(!waiting.contains(&init[0]));
    let refilled = spares_reach(&d, 2).await;
    assert!(refilled.iter().all(|p| !waiting.contains(p)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spares_leave_with_a_crashed_auraed_and_the_pool_is_rebuilt() {
    let test = "spares_leave_with_a_crashed_auraed_and_the_pool_is_rebuilt";
    let Some((mut d, c)) = daemon(test, 3).await else {
        return;
    };
    spares_reach(&d, 3).await;
    allocate(&c, "kept").await;
    drop(c);
    // The three waiting now (the cell took one, the pool made another).
    let before = spares_reach(&d, 3).await;
    d.crash_and_restart().await.unwrap();
    // The old spares read EOF and exited; nothing of theirs is left.
    for p in &before {
        let gone = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            !Path::new(&format!("/proc/{p}")).exists()
                || std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))
        });
        assert!(
            gone,
            "spare {p} outlived its auraed: {:?} wchan {:?} fds {:?}",
            std::fs::read_to_string(format!("/proc/{p}/stat")),
            std::fs::read_to_string(format!("/proc/{p}/wchan")),
            std::fs::read_dir(format!("/proc/{p}/fd")).map(|r| r
                .flatten()
                .map(|e| std::fs::read_link(e.path()))
                .collect::<Vec<_>>())
        );
    }
    let after = spares_reach(&d, 3).await;
    assert!(after.iter().all(|p| !before.contains(p)));
    let c = d.client("admin").await.unwrap();
    // The re-adopted cell still works; no warning about the pool's group.
    let out = probe(&c, "kept", "see", "hostname").await;
    assert_eq!(out, "kept\n");
    assert!(
        !d.log_text()
            .contains("\"cell-pool\" left by a previous auraed")
    );
    // A clean shutdown removes the pool.
    let root = d.cgroup.clone().unwrap();
    d.terminate(Duration::from_secs(20)).unwrap();
    assert!(
        !root.join("cell-pool").exists(),
        "the pool's group is removed on shutdown"
    );
}
