//! `kill -9` of auraed, then a restart on the same state directory and cgroup root (host
//! tier): what ran is served again from its records (status, logs including what was
//! written while auraed was down, stop, free); what no record explains is killed and
//! removed, each reported; nothing leaks; a second auraed on a state directory in use is
//! refused before it touches anything.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{path::Path, time::Duration};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    Daemon, DaemonOptions, holder_of,
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

fn sh(cell: &str, name: &str, script: &str) -> pb::Executable {
    pb::Executable {
        cell: cell.into(),
        name: name.into(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

async fn daemon(test: &str) -> Option<Daemon> {
    if !tier::check(test, Tier::Host, tier::needs_cells()) {
        return None;
    }
    Some(
        Daemon::start(
            Path::new(env!("CARGO_BIN_EXE_auraed")),
            DaemonOptions::default(),
        )
        .await
        .unwrap(),
    )
}

/// The cells' cgroups under `root` (not the pool of spare inits' own group).
fn cgroups_left(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()) && e.file_name() != "cell-pool")
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Allocates a cell with no options.
async fn allocate(c: &Client, name: &str) -> Result<pb::CellStatus, tonic::Status> {
    c.cells()
        .allocate(pb::Cell {
            name: name.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The names of every cell auraed serves, sorted.
async fn cell_names(c: &Client) -> Vec<String> {
    let mut v: Vec<String> = c
        .cells()
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cells
        .into_iter()
        .map(|c| c.name)
        .collect();
    v.sort();
    v
}

async fn free(c: &Client, name: &str) {
    c.cells()
        .free(pb::NameRef { name: name.into() })
        .await
        .unwrap_or_else(|e| panic!("free {name}: {e:?}"));
}

async fn status(c: &Client, cell: &str, name: &str) -> pb::ExecutableStatus {
    workload::status(c, cell, name)
        .await
        .unwrap_or_else(|e| panic!("{cell}/{name}: {e:?}"))
}

/// 50 cells (quiet, chatty, nested, one whose process dies while auraed is down):
/// `kill -9`, restart → every one served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_50_cells_then_restart_readopts_all_of_them() {
    let Some(mut d) = daemon("kill_9_with_50_cells_then_restart_readopts_all_of_them").await else {
        return;
    };
    let root = d.cgroup.clone().unwrap();
    let c = d.client("admin").await.unwrap();
    const TOP: usize = 40;
    let mut cells = Vec::new();
    for i in 0..TOP {
        let cell = format!("c{i}");
        allocate(&c, &cell).await.unwrap();
        cells.push(cell.clone());
        if i % 4 == 0 {
            let nested = format!("{cell}/nested");
            allocate(&c, &nested).await.unwrap();
            c.runtime()
                .run_executable(sh(&nested, "w", "while :; do sleep 1; done"))
                .await
                .unwrap();
            cells.push(nested);
        }
        let script = match i % 3 {
            0 => "while :; do sleep 1; done".to_owned(),
            // Chatty: a line every 20 ms, numbered, so output written while auraed is
            // down shows up after the restart.
            1 => "n=0; while :; do n=$((n+1)); echo tick $n; sleep 0.02; done".to_owned(),
            // Dies while auraed is down.
            _ => "sleep 1.5; exit 3".to_owned(),
        };
        c.runtime()
            .run_executable(sh(&cell, "w", &script))
            .await
            .unwrap();
    }
    assert_eq!(cells.len(), 50);
    let before = c
        .executables()
        .list(pb::ListExecutablesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .executables;
    let pids: Vec<(String, i32)> = before
        .iter()
        .map(|e| (format!("{}/{}", e.cell, e.name), e.pid))
        .collect();
    // A second auraed on the same state directory is refused, naming the holder.
    let (st, log) = d.start_second(Duration::from_secs(20)).unwrap();
    assert!(st.is_some_and(|s| !s.success()), "{st:?}\n{log}");
    assert!(
        log.contains("in use by another auraed")
            && log.contains(&format!("pid {}", d.pid().unwrap())),
        "{log}"
    );

    d.crash_and_restart_after(Duration::from_secs(2))
        .await
        .unwrap();
    let c = d.client("admin").await.unwrap();
    let listed = cell_names(&c).await;
    let readopted = cells.iter().filter(|n| listed.contains(n)).count();
    // The ones that exit by themselves ("sleep 1.5; exit 3") have ended by now, while
    // auraed was down or just after (a re-adopted process's end is seen within ~0.1 s):
    // wait for that before counting.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for (id, _) in &pids {
        let (cell, name) = id.rsplit_once('/').unwrap();
        let top: usize = cell
            .trim_start_matches('c')
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        while !cell.contains('/')
            && top % 3 == 2
            && status(&c, cell, name).await.phase == pb::Phase::Running as i32
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut running = 0;
    let mut ended = 0;
    let mut chatty_ok = 0;
    for (id, pid) in &pids {
        let (cell, name) = id.rsplit_once('/').unwrap();
        let s = status(&c, cell, name).await;
        if s.phase == pb::Phase::Running as i32 {
            if cell
                .trim_start_matches('c')
                .parse::<usize>()
                .is_ok_and(|t| t % 3 == 2)
            {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                println!("{id} (pid {pid}) still running after its end: {s:?}; stat {stat}");
            }
            running += 1;
            assert!(alive(*pid), "{id}: running but pid {pid} is gone");
        } else {
            ended += 1;
            println!("ended: {id}: {:?} {:?}", s.phase, s.exit);
        }
        let top: usize = cell
            .trim_start_matches('c')
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        if !cell.contains('/') && top % 3 == 1 {
            // Its log holds lines written while auraed was down: more ticks than the
            // ~0.2 s it ran before the crash could give, numbered without a gap.
            let out = workload::logs(&c, cell, name, false).await.unwrap();
            let ticks: Vec<u64> = out
                .lines()
                .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
                .collect();
            let contiguous = ticks.windows(2).all(|w| w[1] == w[0] + 1);
            if ticks.len() > 50 && contiguous {
                chatty_ok += 1;
            } else {
                println!(
                    "{id}: {} ticks, contiguous {contiguous}: {ticks:?}",
                    ticks.len()
                );
            }
        }
    }
    println!(
        "kill -9 with {} cells ({} executables), restart: {readopted}/{} cells re-adopted, {running} running, {ended} ended while down (expected {}), chatty logs intact {chatty_ok}/{}",
        cells.len(),
        pids.len(),
        cells.len(),
        TOP / 3,
        (0..TOP).filter(|i| i % 3 == 1).count()
    );
    assert_eq!(readopted, cells.len(), "cells listed: {listed:?}");
    assert_eq!(ended, (0..TOP).filter(|i| i % 3 == 2).count());
    assert_eq!(chatty_ok, (0..TOP).filter(|i| i % 3 == 1).count());
    // Stop and free work on what was re-adopted, and leave nothing.
    for cell in cells.iter().filter(|n| !n.contains('/')) {
        c.cells()
            .stop(pb::StopRequest {
                name: cell.clone(),
                grace_period: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
            })
            .await
            .unwrap();
        free(&c, cell).await;
    }
    let leaked: Vec<&(String, i32)> = pids.iter().filter(|(_, p)| alive(*p)).collect();
    assert!(leaked.is_empty(), "processes leaked: {leaked:?}");
    assert!(cgroups_left(&root).is_empty(), "{:?}", cgroups_left(&root));
}

/// What no record explains (a cgroup made behind auraed's back, a record lost) is
/// killed and removed at the next start, each one reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unexplained_cgroups_are_swept_and_reported() {
    let Some(mut d) = daemon("unexplained_cgroups_are_swept_and_reported").await else {
        return;
    };
    let root = d.cgroup.clone().unwrap();
    let c = d.client("admin").await.unwrap();
    allocate(&c, "kept").await.unwrap();
    // A stray cgroup with a process in it, and a cell whose record is lost.
    let stray = root.join("stray");
    std::fs::create_dir(&stray).unwrap();
    let mut child = std::process::Command::new("/bin/sleep")
        .arg("300")
        .spawn()
        .unwrap();
    std::fs::write(stray.join("cgroup.procs"), child.id().to_string()).unwrap();
    allocate(&c, "lost").await.unwrap();
    std::fs::remove_file(d.dir.path().join("state/store/cell/lost.json")).unwrap();
    // No executable runs: the old holder holds nothing, and must still go.
    let old_holder = holder_of(d.pid().unwrap()).expect("auraed runs an output holder");
    d.crash_and_restart_after(Duration::ZERO).await.unwrap();
    for _ in 0..50 {
        if !alive(old_holder) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !alive(old_holder),
        "the crashed auraed's holder {old_holder} was not retired"
    );
    let c = d.client("admin").await.unwrap();
    let info = c
        .daemon()
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let swept: Vec<&String> = info
        .warnings
        .iter()
        .filter(|w| w.contains("left by a previous auraed"))
        .collect();
    println!("swept: {swept:?}");
    assert_eq!(swept.len(), 2, "{:?}", info.warnings);
    assert!(
        child.wait().is_ok_and(|s| !s.success()),
        "the stray process was killed"
    );
    let mut left = cgroups_left(&root);
    left.sort();
    assert_eq!(left, ["kept"]);
    // A name left by a lost record is usable again.
    allocate(&c, "lost").await.unwrap();
}

/// Every cgroup under `root` as a cell path (leaves and the pool's group excluded).
fn cgroup_cells(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let base = e.file_name().to_string_lossy().into_owned();
            if base == "_procs" || (prefix.is_empty() && base == "cell-pool") {
                continue;
            }
            let name = if prefix.is_empty() {
                base
            } else {
                format!("{prefix}/{base}")
            };
            stack.push((e.path(), name.clone()));
            out.push(name);
        }
    }
    out.sort();
    out
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// 20 crash/restart cycles while two clients allocate, run and free: after each restart
/// what auraed serves is exactly what its cgroups, records and logs hold; at the end
/// nothing is left (processes, cgroups, records, log files, container directories, old
/// holders).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_crashes_under_churn_leak_nothing() {
    let Some(mut d) = daemon("twenty_crashes_under_churn_leak_nothing").await else {
        return;
    };
    let root = d.cgroup.clone().unwrap();
    let state = d.dir.path().join("state");
    let mut all_pids = Vec::new();
    let mut worst_fds = 0;
    let mut holders: Vec<i32> = holder_of(d.pid().unwrap()).into_iter().collect();
    for cycle in 0..20u32 {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut clients = Vec::new();
        for k in 0..2u32 {
            let c = d.client("admin").await.unwrap();
            let stop = stop.clone();
            clients.push(tokio::spawn(async move {
                let mut pids = Vec::new();
                let mut i = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 40 {
                    let cell = format!("k{k}-{}", i % 4);
                    i += 1;
                    if c.cells()
                        .allocate(pb::Cell {
                            name: cell.clone(),
                            ..Default::default()
                        })
                        .await
                        .is_err()
                    {
                        let _ = c.cells().free(pb::NameRef { name: cell }).await;
                        continue;
                    }
                    if let Ok(s) = c
                        .runtime()
                        .run_executable(sh(&cell, "w", "echo hi; sleep 30"))
                        .await
                    {
                        pids.push(s.into_inner().pid);
                    }
                }
                pids
            }));
        }
        tokio::time::sleep(Duration::from_millis(150 + u64::from(cycle % 5) * 60)).await;
        d.crash_and_restart().await.unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in clients {
            all_pids.extend(t.await.unwrap());
        }
        // Invariants after this restart: served == cgroups == records.
        let c = d.client("admin").await.unwrap();
        let served = cell_names(&c).await;
        let records: Vec<String> = files_in(&state.join("store/cell"))
            .into_iter()
            .map(|f| f.trim_end_matches(".json").replace('.', "/"))
            .collect();
        assert_eq!(
            cgroup_cells(&root),
            served,
            "cycle {cycle}: cgroups vs served"
        );
        assert_eq!(records, served, "cycle {cycle}: records vs served");
        let exes = c
            .executables()
            .list(pb::ListExecutablesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .executables
            .len();
        assert_eq!(
            files_in(&state.join("store/executable")).len(),
            exes,
            "cycle {cycle}: executable records vs served"
        );
        worst_fds = worst_fds.max(d.fd_count().unwrap_or(0));
        holders.extend(holder_of(d.pid().unwrap()));
    }
    // Free everything: nothing may be left.
    let c = d.client("admin").await.unwrap();
    for cell in c
        .cells()
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cells
        .into_iter()
        .filter(|c| !c.name.contains('/'))
    {
        c.cells()
            .free(pb::NameRef {
                name: cell.name.clone(),
            })
            .await
            .unwrap();
    }
    let fds = d.fd_count().unwrap_or(0);
    let leaked: Vec<&i32> = all_pids.iter().filter(|p| alive(**p)).collect();
    // Every holder but the running daemon's was retired after its pipes were taken back.
    let current = holder_of(d.pid().unwrap());
    let old_alive: Vec<&i32> = holders
        .iter()
        .filter(|h| Some(**h) != current && alive(**h))
        .collect();
    println!(
        "20 crash/restart cycles under churn: {} workload processes started, {} leaked; cgroups left {:?}; records left {} + {}; log dirs left {:?}; container dirs left {:?}; auraed fds worst {worst_fds}, after freeing {fds}; holders {} seen, {} old ones alive",
        all_pids.len(),
        leaked.len(),
        cgroup_cells(&root),
        files_in(&state.join("store/cell")).len(),
        files_in(&state.join("store/executable")).len(),
        files_in(&state.join("logs")),
        files_in(&state.join("containers")),
        holders.len(),
        old_alive.len(),
    );
    assert!(leaked.is_empty(), "{leaked:?}");
    assert_eq!(holders.len(), 21, "one holder per start: {holders:?}");
    assert!(old_alive.is_empty(), "old holders alive: {old_alive:?}");
    assert!(cgroup_cells(&root).is_empty());
    assert!(files_in(&state.join("store/cell")).is_empty());
    assert!(files_in(&state.join("store/executable")).is_empty());
    assert!(
        files_in(&state.join("logs")).is_empty(),
        "{:?}",
        files_in(&state.join("logs"))
    );
    assert!(files_in(&state.join("containers")).is_empty());
    assert!(fds < 64, "auraed holds {fds} fds with nothing running");
}

/// A container (RunCell) and a sidecar container keep running across `kill -9`: served
/// again with their root (overlay upper directory kept), their image pinned, their logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_is_readopted_after_a_crash() {
    use aurae_testkit::{oci, registry::for_containers};
    let Some(registry) = for_containers("a_container_is_readopted_after_a_crash").unwrap() else {
        return;
    };
    let host = registry.host();
    oci::push_busybox(
        &host,
        "aurae/busybox",
        serde_json::json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]}),
    )
    .unwrap();
    let mut d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            extra_args: vec!["--insecure-registry".to_owned(), host.clone()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let state = d.dir.path().join("state");
    let c = d.client("admin").await.unwrap();
    let image = format!("{host}/aurae/busybox:v1");
    let st = c
        .runtime()
        .run_cell(pb::Cell {
            name: "web".into(),
            container: Some(pb::Container {
                image: image.clone(),
                entrypoint: vec![
                    "sh".into(),
                    "-c".into(),
                    "echo kept > /tmp/mark; n=0; while :; do n=$((n+1)); echo tick $n; sleep 0.05; done".into(),
                ],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let name = st.executables[0].name.clone();
    let pid = st.executables[0].pid;
    // Beside it a read-only root, whose upper layer is in memory in its own mount
    // namespace (its working directory was made there): a crash of auraed does not touch it.
    let ro = c
        .runtime()
        .run_executable(pb::Executable {
            cell: "web".into(),
            name: "ro".into(),
            container: Some(pb::Container {
                image: image.clone(),
                entrypoint: vec![
                    "sh".into(),
                    "-c".into(),
                    "while [ -d /srv/ro ]; do echo ro-alive; sleep 0.05; done; echo ro-gone".into(),
                ],
                working_dir: "/srv/ro".into(),
                read_only_root: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(files_in(&state.join("containers")).len(), 2);
    // A freed container's directory the crash leaves half deleted (moved out of
    // `containers`, its files not yet deleted): the restarted auraed deletes it.
    let half = state.join("containers-removed/0123abcd");
    std::fs::create_dir_all(half.join("upper/etc")).unwrap();
    std::fs::write(half.join("upper/etc/data"), b"x").unwrap();
    std::fs::create_dir_all(half.join("work/work")).unwrap();
    std::fs::set_permissions(
        half.join("work/work"),
        std::os::unix::fs::PermissionsExt::from_mode(0o000),
    )
    .unwrap();
    d.crash_and_restart_after(Duration::from_secs(1))
        .await
        .unwrap();
    assert!(
        files_in(&state.join("containers-removed")).is_empty(),
        "{:?}",
        files_in(&state.join("containers-removed"))
    );
    let c = d.client("admin").await.unwrap();
    let s = status(&c, "web", &name).await;
    assert_eq!(s.phase, pb::Phase::Running as i32, "{s:?}");
    assert!(alive(pid));
    assert_eq!(
        files_in(&state.join("containers")).len(),
        2,
        "their roots were kept"
    );
    let s = status(&c, "web", "ro").await;
    assert_eq!(s.phase, pb::Phase::Running as i32, "{s:?}");
    assert!(alive(ro.pid));
    // Its files are its own still (the upper directory survived), and a sidecar starts
    // in the re-adopted cell.
    c.runtime()
        .run_executable(pb::Executable {
            cell: "web".into(),
            name: "side".into(),
            container: Some(pb::Container {
                image: image.clone(),
                entrypoint: vec!["sh".into(), "-c".into(), "echo sidecar".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    workload::wait(&c, "web", "side").await.unwrap();
    let out = workload::logs(&c, "web", &name, false).await.unwrap();
    let ticks = out.lines().filter(|l| l.starts_with("tick ")).count();
    println!("container across a crash: running, {ticks} ticks in its log");
    assert!(ticks > 15, "{out}");
    let out = workload::logs(&c, "web", "ro", false).await.unwrap();
    assert!(
        out.lines().filter(|l| *l == "ro-alive").count() > 15 && !out.contains("ro-gone"),
        "{out}"
    );
    // Removing the image while the container runs keeps its layers (pinned again).
    c.images()
        .remove(pb::RemoveImageRequest {
            image: image.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        files_in(&state.join("images/layers/sha256")).len(),
        1,
        "the running container's layer was garbage-collected"
    );
    free(&c, "web").await;
    assert!(!alive(pid) && !alive(ro.pid));
    assert!(files_in(&state.join("containers")).is_empty());
}

/// A tmpfs of `size`, mounted on a new temporary directory, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("aurae-fulldisk-")
            .tempdir()
            .unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(format!("size={size},mode=0700").as_str()),
        )
        .unwrap();
        Self { dir }
    }

    /// Writes a file until the disk refuses more.
    fn fill(&self) -> u64 {
        use std::io::Write;
        let mut f = std::fs::File::create(self.dir.path().join("filler")).unwrap();
        let block = vec![0u8; 64 << 10];
        let mut n = 0;
        while f.write(&block).is_ok_and(|w| w > 0) {
            n += block.len() as u64;
        }
        let _ = f.write_all(&[0u8; 1]);
        n
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A full state disk: log writes fail and are reported while the workload runs on; a
/// restart on the full disk still serves (what runs, re-adopted) and takes no new work,
/// saying why; with room again, new work is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_disk_is_reported_and_auraed_still_starts() {
    if !tier::check(
        "a_full_state_disk_is_reported_and_auraed_still_starts",
        Tier::Host,
        tier::needs_cells(),
    ) {
        return;
    }
    let disk = SmallDisk::mount("8M");
    let mut d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            state_dir: Some(disk.dir.path().join("state")),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let c = d.client("admin").await.unwrap();
    let mut holders: Vec<i32> = holder_of(d.pid().unwrap()).into_iter().collect();
    allocate(&c, "busy").await.unwrap();
    let pid = c
        .runtime()
        .run_executable(sh(
            "busy",
            "w",
            "while :; do echo a line of output that goes to the log file; sleep 0.005; done",
        ))
        .await
        .unwrap()
        .into_inner()
        .pid;
    let mut events = c
        .events()
        .watch(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let filled = disk.fill();
    // The log write failure shows as an event and in the executable's status.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut reported = None;
    while let Ok(Ok(Some(e))) = tokio::time::timeout_at(deadline, events.message()).await {
        if e.r#type == pb::EventType::Failed as i32 && e.message.contains("log file") {
            reported = Some(e.message);
            break;
        }
    }
    let st = status(&c, "busy", "w").await;
    println!(
        "full disk ({filled} bytes filled): event {reported:?}; status message {:?}",
        st.message
    );
    assert!(reported.is_some(), "no FAILED event for the log write");
    assert!(st.message.contains("not reaching the log file"), "{st:?}");
    assert_eq!(st.phase, pb::Phase::Running as i32, "the workload runs on");
    // Restart on the full disk.
    d.crash_and_restart().await.unwrap();
    holders.extend(holder_of(d.pid().unwrap()));
    let c = d.client("admin").await.unwrap();
    let info = c
        .daemon()
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        info.warnings.iter().any(|w| w.contains("takes no writes")),
        "{:?}",
        info.warnings
    );
    let st = status(&c, "busy", "w").await;
    assert!(
        st.phase == pb::Phase::Running as i32 && alive(pid),
        "after a restart on the full disk: {st:?}, process {pid} alive: {}; auraed's log:\n{}",
        alive(pid),
        d.log_text()
    );
    let e = c
        .cells()
        .allocate(pb::Cell {
            name: "new".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("no new work"), "{}", e.message());
    // Room again, restart: new work is taken.
    std::fs::remove_file(disk.dir.path().join("filler")).unwrap();
    d.crash_and_restart().await.unwrap();
    holders.extend(holder_of(d.pid().unwrap()));
    let c = d.client("admin").await.unwrap();
    // The output written across both crashes is still served (the first holder kept the
    // pipes while the disk was full).
    let out = workload::logs(&c, "busy", "w", false).await.unwrap();
    assert!(out.contains("a line of output"), "{out}");
    allocate(&c, "new").await.unwrap();
    for cell in ["busy", "new"] {
        free(&c, cell).await;
    }
    assert!(!alive(pid));
    drop(d);
    drop(disk);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let alive_holders: Vec<&i32> = holders.iter().filter(|h| alive(**h)).collect();
    assert!(
        alive_holders.is_empty(),
        "holders left: {alive_holders:?} of {holders:?}"
    );
}

/// A start that cannot read the records (no cgroup tree: a wrong `--cgroup-root`) takes
/// nothing back, so it must leave alone what the records name: it retired the previous
/// auraed's output holder (closing the last read end of every surviving workload's
/// pipes: a chatty one died of SIGPIPE) and removed every cell's logs as strays. Now
/// both are kept, and the next proper start serves the executable again with its
/// output, what was written meanwhile included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_without_its_cgroup_tree_keeps_what_the_records_name() {
    let Some(mut d) = daemon("a_start_without_its_cgroup_tree_keeps_what_the_records_name").await
    else {
        return;
    };
    let c = d.client("admin").await.unwrap();
    allocate(&c, "web").await.unwrap();
    let st = c
        .runtime()
        .run_executable(sh(
            "web",
            "chatty",
            "n=0; while :; do n=$((n+1)); echo tick $n; sleep 0.02; done",
        ))
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let holder = aurae_testkit::holder_of(d.pid().unwrap()).expect("a holder");
    // Kept alive on purpose while the records are not read: killed by pid if the test
    // fails before a proper start retires it.
    struct KillOnDrop(i32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if alive(self.0) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(self.0),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let _old_holder = KillOnDrop(holder);
    let logs = d.dir.path().join("state/logs/web");
    assert!(logs.exists());
    d.crash().unwrap();
    // Started with a cgroup root that is no cgroup2 directory.
    let elsewhere = d.dir.path().join("not-a-cgroup");
    std::fs::create_dir_all(&elsewhere).unwrap();
    d.start_again_with(|args| {
        let i = args.iter().position(|a| a == "--cgroup-root").unwrap();
        args[i + 1] = elsewhere.clone().into_os_string();
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(alive(holder), "the previous holder was retired");
    assert!(
        alive(st.pid),
        "the chatty workload died (its pipe's last reader gone)"
    );
    assert!(logs.exists(), "the cell's logs were removed as strays");
    let info = d
        .client("admin")
        .await
        .unwrap()
        .daemon()
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        info.warnings
            .iter()
            .any(|w| w.contains("is kept: its records were not read")),
        "the kept holder is reported: {:?}",
        info.warnings
    );
    // The next proper start serves it again, with its output.
    d.crash_and_restart().await.unwrap();
    let c = d.client("admin").await.unwrap();
    let e = status(&c, "web", "chatty").await;
    assert_eq!(e.pid, st.pid);
    assert!(e.exit.is_none(), "{e:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = aurae_testkit::workload::logs(&c, "web", "chatty", false)
        .await
        .unwrap();
    let ticks: Vec<u64> = out
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect();
    assert!(ticks.len() > 30, "{out}");
    assert!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "no tick lost across both restarts"
    );
    free(&c, "web").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !alive(holder),
        "the previous holder is retired once its records were read"
    );
}

/// The processes in `cell`'s leaf whose command line is `cmdline` (space-joined).
fn in_leaf(root: &Path, cell: &str, cmdline: &str) -> Vec<i32> {
    std::fs::read_to_string(root.join(cell).join("_procs/cgroup.procs"))
        .unwrap_or_default()
        .split_ascii_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p: &i32| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                c.split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
                    == cmdline
            })
        })
        .collect()
}

/// A start cut by a crash between its spawn and its record left a process no record
/// names: the restarted auraed served the cell without it, and it ran on unseen (a
/// retry of the same start ran a second copy beside it). Now it is killed at the
/// restart, with what it started, and reported; another executable's daemonized child
/// (an orphan of its own workload, reparented to the cell's init) is left alone.
/// The crash window is made exact by removing the executable's record while auraed is
/// down: what the next auraed finds is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_cut_before_its_record_is_killed_at_the_restart() {
    let Some(mut d) = daemon("a_start_cut_before_its_record_is_killed_at_the_restart").await else {
        return;
    };
    let root = d.cgroup.clone().unwrap();
    let c = d.client("admin").await.unwrap();
    allocate(&c, "web").await.unwrap();
    let cut = c
        .runtime()
        .run_executable(sh("web", "cut", "sleep 300 & exec sleep 301"))
        .await
        .unwrap()
        .into_inner();
    let kept = c
        .runtime()
        .run_executable(sh("web", "kept", "(sleep 302 &); exec sleep 303"))
        .await
        .unwrap()
        .into_inner();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (child, orphan) = loop {
        let (a, b) = (
            in_leaf(&root, "web", "sleep 300"),
            in_leaf(&root, "web", "sleep 302"),
        );
        if a.len() == 1 && b.len() == 1 {
            break (a[0], b[0]);
        }
        assert!(std::time::Instant::now() < deadline, "{a:?} {b:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    d.crash().unwrap();
    std::fs::remove_file(d.dir.path().join("state/store/executable/web.cut.json")).unwrap();
    d.start_again().await.unwrap();
    let c = d.client("admin").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while alive(cut.pid) || alive(child) {
        assert!(
            std::time::Instant::now() < deadline,
            "the unrecorded start ({}) and its child ({child}) still run",
            cut.pid
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(alive(kept.pid), "a recorded executable was killed");
    assert!(alive(orphan), "a workload's own orphan was killed");
    let info = c
        .daemon()
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let reported: Vec<&String> = info
        .warnings
        .iter()
        .filter(|w| w.contains("stopped before recording it"))
        .collect();
    assert_eq!(reported.len(), 1, "{:?}", info.warnings);
    assert!(reported[0].contains(&cut.pid.to_string()), "{reported:?}");
    assert!(reported[0].contains("2 processes"), "{reported:?}");
    let e = status(&c, "web", "kept").await;
    assert!(e.exit.is_none(), "{e:?}");
    free(&c, "web").await;
    assert!(!alive(kept.pid) && !alive(orphan));
}
