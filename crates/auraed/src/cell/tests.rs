//! Cells and executables against the fakes (an in-memory cgroup tree, a spawner that
//! records requests and runs programs as plain children): no root, no cgroups.

use std::{sync::Arc, time::Duration};

use aurae_proto::runtime::v0 as pb;

use crate::workload::Phase;

use super::{
    CellSpec, Cells,
    record::{CellRecord, ExecutableRecord},
    registry::CellsDeps,
};
use crate::{
    events::EventBus,
    executable::ExecutableSpec,
    spec::{CellName, Label},
    store::{Store, kinds},
    workload::{
        WorkloadError,
        cgroup::{CgroupTree, FakeTree},
        spawner::FakeSpawner,
    },
};

struct Fixture {
    cells: Arc<Cells>,
    tree: Arc<FakeTree>,
    spawner: Arc<FakeSpawner>,
    store: Store,
    _dir: tempfile::TempDir,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.spawner.kill_all();
    }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let tree = Arc::new(FakeTree::with_controllers(&["memory", "pids"]));
    let spawner = Arc::new(FakeSpawner::default());
    let store = Store::open(&dir.path().join("state")).unwrap();
    let cells = cells_on(dir.path(), &tree, &spawner, &store);
    Fixture {
        cells,
        tree,
        spawner,
        store,
        _dir: dir,
    }
}

fn cell(name: &str) -> CellSpec {
    CellSpec::parse(
        pb::Cell {
            name: name.into(),
            ..Default::default()
        },
        false,
        2,
    )
    .unwrap()
}

fn exe(cell: &str, name: &str, argv: &[&str], uid: Option<u32>) -> ExecutableSpec {
    ExecutableSpec {
        cell: CellName::parse("cell", cell).unwrap(),
        name: Some(Label::parse("name", name).unwrap()),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
        working_dir: "/".into(),
        uid,
        gid: uid,
        stdin: Vec::new(),
        allow_new_privileges: false,
        allow_mixed_cell: false,
        free_on_exit: None,
        container: None,
        interactive: Default::default(),
        limits: None,
    }
}

/// A container executable `name` in `cell` (its image never pulled: for the checks made
/// before a start).
fn container_exe(cell: &str, name: &str) -> ExecutableSpec {
    let mut s = exe(cell, name, &[], None);
    s.container = Some(
        crate::container::ContainerSpec::parse(
            "container",
            Some(pb::Container {
                image: "reg/x:1".into(),
                ..Default::default()
            }),
        )
        .unwrap(),
    );
    s
}

#[tokio::test]
async fn allocate_makes_the_cgroup_attaches_the_filter_starts_the_init_and_records_it() {
    let f = fixture();
    f.cells.allocate(cell("web")).await.unwrap();
    assert!(f.tree.has("web"));
    assert!(f.tree.has_device_filter("web"));
    let init = &f.spawner.requests()[0];
    assert_eq!(init.argv[1], crate::workload::layout::CELL_INIT_ARG);
    assert!(init.into_cgroup, "the init is born in the cell's cgroup");
    let new = init.new_namespaces;
    for ns in [
        libc_ns::PID,
        libc_ns::MOUNT,
        libc_ns::NET,
        libc_ns::IPC,
        libc_ns::UTS,
    ] {
        assert_ne!(new & ns, 0, "namespace {ns:#x} missing from {new:#x}");
    }
    // The cgroup namespace is the init's own second step, once it is in the cell's leaf.
    assert_eq!(new & libc_ns::CGROUP, 0);
    assert!(
        init.argv[2].split(',').any(|f| f == "cgroup"),
        "{:?}",
        init.argv
    );
    assert!(init.no_new_privs);
    let rec: CellRecord = f.store.get(kinds::CELL, "web").unwrap().unwrap();
    assert_eq!(rec.spec.name.as_str(), "web");
    assert!(rec.init.is_some());
    // Again: ALREADY_EXISTS, nothing new spawned.
    let before = f.spawner.requests().len();
    assert!(matches!(
        f.cells.allocate(cell("web")).await,
        Err(WorkloadError::Exists(_))
    ));
    assert_eq!(f.spawner.requests().len(), before);
    // The VM group's name is not a cell's, nor the pool's.
    assert!(f.cells.allocate(cell("vms")).await.is_err());
    assert!(matches!(
        f.cells.allocate(cell("cell-pool")).await,
        Err(WorkloadError::Exists(m)) if m.contains("spare cell inits")
    ));
    // A parent must exist first.
    assert!(matches!(
        f.cells.allocate(cell("nope/child")).await,
        Err(WorkloadError::NotFound(_))
    ));
    f.cells
        .free(&CellName::parse("n", "web").unwrap())
        .await
        .unwrap();
    assert!(!f.tree.has("web"));
    assert_eq!(
        f.store
            .get::<CellRecord>(kinds::CELL, "web")
            .unwrap()
            .map(|_| ()),
        None
    );
}

#[tokio::test]
async fn a_cell_whose_filter_cannot_attach_is_refused_and_leaves_nothing() {
    let f = fixture();
    f.tree.refuse_device_filter();
    let e = f.cells.allocate(cell("web")).await.unwrap_err();
    assert!(e.to_string().contains("device filter"), "{e}");
    assert!(!f.tree.has("web"));
    assert!(f.spawner.requests().is_empty(), "no init was started");
}

#[tokio::test]
async fn run_asks_for_the_ids_and_no_new_privs_and_captures_output_and_exit() {
    let f = fixture();
    f.cells.allocate(cell("web")).await.unwrap();
    let st = f
        .cells
        .run(
            exe(
                "web",
                "hello",
                &["/bin/sh", "-c", "echo out; echo err >&2; exit 7"],
                Some(1000),
            ),
            None,
        )
        .await
        .unwrap();
    // It may have exited already (the start runs in a task of its own).
    assert!(matches!(
        st.state.borrow().phase,
        Phase::Running | Phase::Exited
    ));
    let req = f.spawner.requests().last().cloned().unwrap();
    assert_eq!((req.uid, req.gid), (Some(1000), Some(1000)));
    assert!(
        req.no_new_privs,
        "a tenant's plain executable gets no_new_privs"
    );
    assert!(req.into_cgroup);
    assert!(req.joins.is_some(), "it joins the init's namespaces");
    let r = crate::executable::ExecutableRef {
        cell: CellName::parse("c", "web").unwrap(),
        name: Label::parse("n", "hello").unwrap(),
    };
    let e = f.cells.executable(&r).unwrap();
    let exit = e.wait(Some(Duration::from_secs(10))).await.unwrap();
    assert_eq!(exit.status, Some(aurae_sys::ExitStatus::Code(7)));
    // The output reaches the log (both streams).
    let mut rx = e.log.subscribe();
    let _ = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.1)).await;
    let text: Vec<u8> = e
        .log
        .read_from(0)
        .0
        .into_iter()
        .flat_map(|c| c.data)
        .collect();
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("out") && text.contains("err"), "{text:?}");
    // Recorded with its exit; forgotten when freed.
    let rec: ExecutableRecord = f
        .store
        .get(kinds::EXECUTABLE, "web/hello")
        .unwrap()
        .unwrap();
    assert_eq!(rec.exit.map(|x| x.code), Some(Some(7)));
    f.cells.free_executable(&r).unwrap();
    assert!(
        f.store
            .get::<ExecutableRecord>(kinds::EXECUTABLE, "web/hello")
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_container_never_joins_a_tree_of_plain_executables() {
    let f = fixture();
    f.cells.allocate(cell("web")).await.unwrap();
    f.cells.allocate(cell("web/side")).await.unwrap();
    f.cells
        .run(exe("web", "plain", &["/bin/sleep", "5"], Some(1000)), None)
        .await
        .unwrap();
    // The first start fixed the tree's kind (recorded); it covers the nested cell.
    let rec: CellRecord = f.store.get(kinds::CELL, "web").unwrap().unwrap();
    assert_eq!(rec.runs_containers, Some(false));
    let container = || container_exe("web/side", "c");
    let e = f.cells.claim_kind(&container()).unwrap_err();
    assert!(e.to_string().contains("/proc/<pid>/root"), "{e}");
    // Another plain executable is fine.
    f.cells
        .run(exe("web/side", "p2", &["/bin/true"], Some(1000)), None)
        .await
        .unwrap();
    // With a grant that allows host namespaces, mixing is allowed.
    let mut allowed = container();
    allowed.allow_mixed_cell = true;
    f.cells.claim_kind(&allowed).unwrap();
    f.cells
        .stop(
            &CellName::parse("n", "web").unwrap(),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
}

/// A cell allocated for one kind (RunCell's) has it recorded with the cell at once: its
/// first start writes the cell's record no second time, the other kind is refused as in a
/// tree whose first start fixed it, and a nested cell leaves the kind to its top.
#[tokio::test]
async fn a_cell_allocated_for_a_kind_records_it_with_the_cell() {
    use std::os::unix::fs::MetadataExt;
    let f = fixture();
    let cells = f.cells.clone();
    super::registry::detached("allocate", move |t| async move {
        cells.allocate_for(cell("one"), false, t).await
    })
    .await
    .unwrap();
    let rec: CellRecord = f.store.get(kinds::CELL, "one").unwrap().unwrap();
    assert_eq!(rec.runs_containers, Some(false));
    let record_file = || {
        let files: Vec<_> = std::fs::read_dir(f._dir.path().join("state/store/cell"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(files.len(), 1);
        files[0].metadata().unwrap().ino()
    };
    let before = record_file();
    f.cells
        .run(exe("one", "plain", &["/bin/sleep", "5"], Some(1000)), None)
        .await
        .unwrap();
    assert_eq!(record_file(), before, "the cell's record was written again");
    let mut c = container_exe("one", "c");
    let e = f.cells.claim_kind(&c).unwrap_err();
    assert!(e.to_string().contains("/proc/<pid>/root"), "{e}");
    // Nested: the top's kind holds.
    let cells = f.cells.clone();
    super::registry::detached("allocate", move |t| async move {
        cells.allocate_for(cell("one/two"), true, t).await
    })
    .await
    .unwrap();
    let rec: CellRecord = f.store.get(kinds::CELL, "one/two").unwrap().unwrap();
    assert_eq!(rec.runs_containers, None);
    c.cell = CellName::parse("n", "one/two").unwrap();
    assert!(f.cells.claim_kind(&c).is_err());
    f.cells
        .stop(
            &CellName::parse("n", "one").unwrap(),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_failing_spawn_is_reported_and_leaves_no_executable() {
    let f = fixture();
    f.cells.allocate(cell("web")).await.unwrap();
    *f.spawner.fail_with.lock().unwrap() = Some(libc_errno::EAGAIN);
    let e = f
        .cells
        .run(exe("web", "x", &["/bin/true"], Some(1000)), None)
        .await
        .unwrap_err();
    assert!(matches!(e, WorkloadError::Spawn { .. }), "{e:?}");
    assert!(f.cells.executables(|_| true).is_empty());
    assert!(
        f.store
            .get::<ExecutableRecord>(kinds::EXECUTABLE, "web/x")
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn stop_signals_every_executable_then_kills_the_cgroup() {
    let f = fixture();
    f.cells.allocate(cell("web")).await.unwrap();
    f.cells
        .run(exe("web", "a", &["/bin/sleep", "30"], Some(1000)), None)
        .await
        .unwrap();
    f.cells
        .run(
            exe(
                "web",
                "b",
                &["/bin/sh", "-c", "trap '' TERM; sleep 30"],
                Some(1000),
            ),
            None,
        )
        .await
        .unwrap();
    let t0 = std::time::Instant::now();
    let st = f
        .cells
        .stop(
            &CellName::parse("n", "web").unwrap(),
            Duration::from_millis(300),
        )
        .await
        .unwrap();
    assert_eq!(st.phase_and_message().0, Phase::Exited);
    assert_eq!(
        f.tree
            .files("web")
            .unwrap()
            .get("cgroup.kill")
            .map(String::as_str),
        Some("1"),
        "the grace period ended with cgroup.kill"
    );
    let a = f
        .cells
        .executable(&crate::executable::ExecutableRef {
            cell: CellName::parse("c", "web").unwrap(),
            name: Label::parse("n", "a").unwrap(),
        })
        .unwrap();
    assert_eq!(
        a.wait(Some(Duration::from_secs(5))).await.unwrap().status,
        Some(aurae_sys::ExitStatus::Signal(15))
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    let rec: CellRecord = f.store.get(kinds::CELL, "web").unwrap().unwrap();
    assert!(rec.stopped.is_some(), "the stop is recorded");
}

/// Namespace flags as the kernel spells them (the fake records them raw).
mod libc_ns {
    pub const PID: i32 = nix::libc::CLONE_NEWPID;
    pub const MOUNT: i32 = nix::libc::CLONE_NEWNS;
    pub const NET: i32 = nix::libc::CLONE_NEWNET;
    pub const IPC: i32 = nix::libc::CLONE_NEWIPC;
    pub const UTS: i32 = nix::libc::CLONE_NEWUTS;
    pub const CGROUP: i32 = nix::libc::CLONE_NEWCGROUP;
}

mod libc_errno {
    pub const EAGAIN: i32 = nix::libc::EAGAIN;
}

/// A privileged start of the other kind marks the tree mixed: nobody unprivileged starts
/// anything there after it (a container would sit beside the privileged plain process).
#[tokio::test]
async fn after_a_privileged_mix_nothing_unprivileged_starts() {
    let f = fixture();
    f.cells.allocate(cell("web")).await.unwrap();
    let mut privileged = exe("web", "admin", &["/bin/sleep", "5"], Some(1000));
    privileged.allow_mixed_cell = true;
    f.cells.run(privileged, None).await.unwrap();
    let rec: CellRecord = f.store.get(kinds::CELL, "web").unwrap().unwrap();
    assert_eq!(
        rec.runs_containers,
        Some(false),
        "a privileged start fixes the kind too"
    );
    let mut container = container_exe("web", "c");
    assert!(f.cells.claim_kind(&container).is_err());
    container.allow_mixed_cell = true;
    f.cells.claim_kind(&container).unwrap();
    let rec: CellRecord = f.store.get(kinds::CELL, "web").unwrap().unwrap();
    assert!(rec.mixed);
    let e = f
        .cells
        .run(exe("web", "tenant", &["/bin/true"], Some(1000)), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("mixed"), "{e}");
}

/// Two starts of one name at once: one wins, the other is ALREADY_EXISTS (both used to
/// pass the check, and one process got lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_starts_of_one_name_never_both_succeed() {
    let f = fixture();
    f.cells.allocate(cell("web")).await.unwrap();
    for round in 0..20 {
        let name = format!("twin{round}");
        let (a, b) = tokio::join!(
            f.cells
                .run(exe("web", &name, &["/bin/sleep", "5"], Some(1000)), None),
            f.cells
                .run(exe("web", &name, &["/bin/sleep", "5"], Some(1000)), None),
        );
        assert!(
            a.is_ok() != b.is_ok(),
            "round {round}: {:?} / {:?}",
            a.as_ref().map(|_| ()),
            b.as_ref().map(|_| ())
        );
        let e = a.err().or(b.err()).unwrap();
        assert!(matches!(e, WorkloadError::Exists(_)), "{e:?}");
    }
}

/// Free right after Wait: the exit record was written before Wait returned, so Free's
/// delete is the last word (a late write used to bring freed executables back after a
/// restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freed_executable_leaves_no_record_behind() {
    let f = fixture();
    f.cells.allocate(cell("web")).await.unwrap();
    for i in 0..20 {
        let name = format!("e{i}");
        f.cells
            .run(exe("web", &name, &["/bin/true"], Some(1000)), None)
            .await
            .unwrap();
        let r = crate::executable::ExecutableRef {
            cell: CellName::parse("c", "web").unwrap(),
            name: Label::parse("n", &name).unwrap(),
        };
        f.cells
            .executable(&r)
            .unwrap()
            .wait(Some(Duration::from_secs(10)))
            .await
            .unwrap();
        f.cells.free_executable(&r).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        f.store
            .load::<ExecutableRecord>(kinds::EXECUTABLE)
            .records
            .is_empty()
    );
}

/// Waits until the pool holds `n` spares (the fakes answer at once).
async fn pool_holds(f: &Fixture, n: usize) {
    for _ in 0..500 {
        if f.cells.pool().waiting() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the pool holds {} spares, not {n}",
        f.cells.pool().waiting()
    );
}

fn inits(f: &Fixture) -> usize {
    f.spawner
        .requests()
        .iter()
        .filter(|r| r.argv[1] == crate::workload::layout::CELL_INIT_ARG)
        .count()
}

#[tokio::test]
async fn a_pooled_init_is_moved_into_the_cell_and_the_pool_refills() {
    let f = fixture();
    f.cells.start_pool(Some(2)).await;
    pool_holds(&f, 2).await;
    assert!(
        f.tree.has("cell-pool"),
        "the spares wait in their own group"
    );
    assert!(f.tree.has_device_filter("cell-pool"));
    assert_eq!(inits(&f), 2);
    let spare = f.cells.pool().waiting();
    let c = f.cells.allocate(cell("web")).await.unwrap();
    // The cell's init is a spare: moved into its leaf, not a new clone in the cell.
    let pid = c.init_pid().unwrap();
    let moved = f
        .tree
        .read(&CellName::parse("n", "web").unwrap(), "moved")
        .unwrap();
    assert_eq!(moved, pid.to_string());
    assert!(f.tree.has_device_filter("web"));
    pool_holds(&f, spare).await;
    assert_eq!(inits(&f), 3, "one spare made to replace the one taken");
    // Not from the pool: a nested cell (its parent's PID namespace) and a cell sharing a
    // host namespace; they start their own init in their own leaf.
    f.cells.allocate(cell("web/api")).await.unwrap();
    let mut host_net = cell("hn");
    host_net.namespaces.share_host_net = true;
    let hn = f.cells.allocate(host_net).await.unwrap();
    assert!(
        f.tree
            .read(&CellName::parse("n", "hn").unwrap(), "moved")
            .is_err(),
        "a cell sharing the host network starts its own init"
    );
    assert!(hn.init_pid().is_some());
    assert_eq!(inits(&f), 5);
    pool_holds(&f, 2).await;
    // Shutdown drains the pool: its spares killed, its group gone, no refill.
    f.cells.shutdown(Duration::ZERO).await;
    assert_eq!(f.cells.pool().waiting(), 0);
    assert!(!f.tree.has("cell-pool"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(inits(&f), 5, "a drained pool makes no more spares");
}

#[tokio::test]
async fn a_pool_left_by_a_previous_auraed_is_removed_and_size_zero_keeps_none() {
    let f = fixture();
    f.tree
        .create(&CellName::parse("n", "cell-pool").unwrap())
        .unwrap();
    f.cells.start_pool(Some(0)).await;
    assert!(!f.tree.has("cell-pool"));
    f.cells.allocate(cell("web")).await.unwrap();
    assert_eq!(inits(&f), 1);
    assert_eq!(f.cells.pool().waiting(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_on_one_name_take_turns_others_run_at_once() {
    let f = fixture();
    // Eight allocations of one name at once: exactly one cell.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let c = f.cells.clone();
        set.spawn(async move { c.allocate(cell("same")).await.is_ok() });
    }
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        ok += usize::from(r.unwrap());
    }
    assert_eq!(ok, 1);
    // Different names, and frees, and nested cells, all at once: every one done.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8 {
        let c = f.cells.clone();
        set.spawn(async move {
            let top = format!("n{i}");
            c.allocate(cell(&top)).await?;
            c.allocate(cell(&format!("{top}/kid"))).await?;
            c.free(&CellName::parse("n", &top).unwrap()).await?;
            c.allocate(cell(&top)).await.map(|_| ())
        });
    }
    let frees = f.cells.clone();
    set.spawn(async move { frees.free(&CellName::parse("n", "same").unwrap()).await });
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
    let names: Vec<String> = f
        .cells
        .list(|_| true)
        .iter()
        .map(|c| c.spec.name.to_string())
        .collect();
    assert_eq!(names, ["n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7"]);
    assert_eq!(f.cells.names_in_flight(), 0, "no name lock is kept");
    f.cells.shutdown(Duration::ZERO).await;
    assert!(f.cells.list(|_| true).is_empty());
}

/// An interactive executable: an attach writes its stdin (a pipe auraed keeps open, not
/// /dev/null) and follows its output from now; a second attach writes too; with
/// `stdin_once` the first attach's end closes the stdin (the process reads EOF).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attach_writes_an_interactive_stdin_and_stdin_once_closes_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = fixture();
    f.cells.allocate(cell("web")).await.unwrap();
    let mut spec = exe("web", "cat", &["/bin/cat"], None);
    spec.interactive = crate::executable::Interactive {
        stdin: true,
        stdin_once: true,
        tty: false,
    };
    let cat = f.cells.run(spec, None).await.unwrap();
    assert!(cat.input.as_ref().is_some_and(|i| i.is_open()));
    // An attach that does not write leaves the stdin as it is, also when it goes.
    let watcher = super::session::Session::attach(cat.clone(), false, None).unwrap();
    assert!(watcher.stdin.is_none());
    drop(watcher);
    assert!(cat.input.as_ref().is_some_and(|i| i.is_open()));
    let watcher = super::session::Session::attach(cat.clone(), false, None).unwrap();
    let claimed = |f: &Fixture| {
        let r: super::record::ExecutableRecord =
            f.store.get(kinds::EXECUTABLE, "web/cat").unwrap().unwrap();
        r.stdin_claimed
    };
    assert!(!claimed(&f));
    let mut first = super::session::Session::attach(cat.clone(), true, None).unwrap();
    assert!(claimed(&f), "recorded: a restart now closes it too");
    let mut w = first.stdin.take().unwrap();
    w.write_all(b"one\n").await.unwrap();
    let mut out = first.stdout.take().unwrap();
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), out.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"one\n");
    assert!(!cat.exited(), "cat still reads");
    // The first writer's end (stdin_once) closes the stdin: cat reads EOF and exits.
    drop(w);
    drop(first);
    let exit = cat.wait(Some(Duration::from_secs(10))).await.unwrap();
    assert_eq!(exit.status, Some(aurae_sys::ExitStatus::Code(0)));
    assert!(!cat.input.as_ref().unwrap().is_open());
    let again = super::session::Session::attach(cat.clone(), true, None).unwrap_err();
    assert!(again.to_string().contains("has exited"), "{again}");
    drop(watcher);
    // Attaching to input that was never kept is refused naming `stdin`.
    let plain = f
        .cells
        .run(exe("web", "sleeper", &["/bin/sleep", "5"], None), None)
        .await
        .unwrap();
    let err = super::session::Session::attach(plain.clone(), true, None).unwrap_err();
    assert!(err.to_string().starts_with("stdin"), "{err}");
    let _ = plain.signal(nix::libc::SIGKILL);
}

/// An executable started with limits gets a cgroup of its own below its cell's, with its
/// limits written (memory.oom.group off unless asked); Update changes the fields it sets
/// and keeps the rest (recorded); a limit whose controller is missing is refused naming
/// the field before anything is made; one without a group of its own cannot be updated;
/// its end kills what it left there; its free removes the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executable_with_limits_gets_its_own_group() {
    let f = fixture();
    f.cells.allocate(cell("web")).await.unwrap();
    let limits = |l: pb::CellLimits| {
        crate::executable::spec::own_limits("limits", Some(l))
            .unwrap()
            .map(Box::new)
    };
    let mut spec = exe("web", "api", &["/bin/sleep", "30"], None);
    spec.limits = limits(pb::CellLimits {
        memory_max_bytes: Some(64 << 20),
        pids_max: Some(16),
        ..Default::default()
    });
    let api = f.cells.run(spec, None).await.unwrap();
    let files = f.tree.files("web/_exe.api").expect("its own group");
    assert_eq!(files["memory.max"], (64u64 << 20).to_string());
    assert_eq!(files["pids.max"], "16");
    assert_eq!(files["memory.oom.group"], "0");
    let r = crate::executable::ExecutableRef {
        cell: CellName::parse("cell", "web").unwrap(),
        name: Label::parse("name", "api").unwrap(),
    };
    let update = super::spec::Limits {
        memory_max: Some(32 << 20),
        ..Default::default()
    };
    f.cells.update_limits(&r, &update, Some(true)).unwrap();
    let files = f.tree.files("web/_exe.api").unwrap();
    assert_eq!(files["memory.max"], (32u64 << 20).to_string());
    assert_eq!(files["pids.max"], "16", "a field not given stays");
    assert_eq!(files["memory.oom.group"], "1");
    let rec: ExecutableRecord = f.store.get(kinds::EXECUTABLE, "web/api").unwrap().unwrap();
    let kept = rec.limits.expect("recorded");
    assert_eq!(
        (kept.memory_max, kept.pids_max, kept.memory_oom_group),
        (Some(32 << 20), Some(16), true)
    );
    // A controller this tree lacks: refused naming the field, nothing made.
    let mut cpu = exe("web", "cpu", &["/bin/true"], None);
    cpu.limits = limits(pb::CellLimits {
        cpu_weight: Some(100),
        ..Default::default()
    });
    let err = f.cells.run(cpu, None).await.unwrap_err().to_string();
    assert!(
        err.contains("limits.cpu_weight") && err.contains("cpu controller"),
        "{err}"
    );
    assert!(!f.tree.has("web/_exe.cpu"));
    let err = f
        .cells
        .update_limits(
            &r,
            &super::spec::Limits {
                cpu_weight: Some(5),
                ..Default::default()
            },
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("limits.cpu_weight"), "{err}");
    // Without limits: no group of its own, nothing to update.
    f.cells
        .run(exe("web", "plain", &["/bin/sleep", "30"], None), None)
        .await
        .unwrap();
    assert!(!f.tree.has("web/_exe.plain"));
    let plain = crate::executable::ExecutableRef {
        cell: r.cell.clone(),
        name: Label::parse("name", "plain").unwrap(),
    };
    let err = f
        .cells
        .update_limits(&plain, &update, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no cgroup of its own"), "{err}");
    // Its end kills what it left in its group; its free removes the group.
    api.signal(nix::libc::SIGKILL).unwrap();
    api.wait(Some(Duration::from_secs(10))).await.unwrap();
    assert_eq!(
        f.tree.files("web/_exe.api").unwrap().get("cgroup.kill"),
        Some(&"1".to_owned())
    );
    let err = f
        .cells
        .update_limits(&r, &update, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("has ended"), "{err}");
    f.cells.free_executable(&r).unwrap();
    assert!(!f.tree.has("web/_exe.api"));
    // A cell's free takes its executables' groups with it.
    let mut again = exe("web", "again", &["/bin/sleep", "30"], None);
    again.limits = limits(pb::CellLimits::default());
    f.cells.run(again, None).await.unwrap();
    assert!(f.tree.has("web/_exe.again"));
    f.spawner.kill_all();
    f.cells
        .free(&CellName::parse("cell", "web").unwrap())
        .await
        .unwrap();
    assert!(!f.tree.has("web/_exe.again") && !f.tree.has("web"));
}

/// Free writes no record of its stop (the cell's records are deleted right after); when
/// the removal fails (here: a group inside the cell's cgroup that no cell of ours is), the
/// cell stays, stopped, and its record says so — as a Stop's would; a later Free removes
/// it and its record.
#[tokio::test]
async fn a_free_that_cannot_remove_its_cell_leaves_it_recorded_as_stopped() {
    let f = fixture();
    let web = CellName::parse("n", "web").unwrap();
    let stray = CellName::parse("n", "web/stray").unwrap();
    f.cells.allocate(cell("web")).await.unwrap();
    let rec: CellRecord = f.store.get(kinds::CELL, "web").unwrap().unwrap();
    assert!(rec.stopped.is_none());
    f.tree.create(&stray).unwrap();
    let e = f.cells.free(&web).await.unwrap_err();
    assert!(e.to_string().contains("child cells"), "{e}");
    assert!(f.tree.has("web"));
    let rec: CellRecord = f.store.get(kinds::CELL, "web").unwrap().unwrap();
    assert_eq!(rec.stopped.as_deref(), Some("stopped"), "{rec:?}");
    f.tree.remove(&stray).unwrap();
    f.cells.free(&web).await.unwrap();
    assert!(!f.tree.has("web"));
    assert!(
        f.store
            .get::<CellRecord>(kinds::CELL, "web")
            .unwrap()
            .is_none()
    );
}

/// A cell freed while one of its executables is being started: the start fails, its
/// child is killed, and nothing of it is left — no record, and no log file or log
/// directory made by output the child wrote meanwhile (its pump used to start before
/// the start found its cell gone and made `logs/<cell>/` again after the free removed it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_cell_is_freed_meanwhile_fails_and_leaves_nothing() {
    let f = fixture();
    let logs = f._dir.path().join("logs").join("web");
    f.cells.allocate(cell("web")).await.unwrap();
    let (spawned_tx, spawned) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    *f.spawner.gate.lock().unwrap() = Some((spawned_tx, go_rx));
    let cells = f.cells.clone();
    let start = tokio::spawn(async move {
        cells
            .run(
                exe(
                    "web",
                    "talker",
                    &["/bin/sh", "-c", "echo out; echo err >&2; exec sleep 30"],
                    Some(1000),
                ),
                None,
            )
            .await
    });
    tokio::task::spawn_blocking(move || spawned.recv())
        .await
        .unwrap()
        .unwrap();
    f.cells
        .free(&CellName::parse("c", "web").unwrap())
        .await
        .unwrap();
    assert!(!logs.exists(), "the free removed the cell's logs");
    // The child has written its output by now (it is running, not held).
    tokio::time::sleep(Duration::from_millis(100)).await;
    go.send(()).unwrap();
    let e = start.await.unwrap().expect_err("the start must fail");
    assert!(
        matches!(&e, WorkloadError::Precondition(m) if m.contains("freed while")),
        "{e:?}"
    );
    // Anything still on its way (a pump, a record) has had its chance.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !logs.exists(),
        "a failed start made the freed cell's log directory again: {:?}",
        std::fs::read_dir(&logs).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
    assert!(
        f.store
            .get::<ExecutableRecord>(kinds::EXECUTABLE, "web/talker")
            .unwrap()
            .is_none()
    );
    assert!(!f.tree.has("web"));
}

/// A restart serves nested cells again whatever their names: a name too long for a file
/// name is stored under its hash (`h-…`), which sorts before its parents' keys — the
/// child was taken for an orphan, its record deleted and its cgroup swept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_serves_again_nested_cells_stored_under_a_hash() {
    let f = fixture();
    let long = |c: char| std::iter::repeat_n(c, 63).collect::<String>();
    let mut names = vec!["zz".to_string()];
    for c in ['a', 'b', 'c', 'd'] {
        let n = format!("{}/{}", names.last().unwrap(), long(c));
        names.push(n);
    }
    assert!(
        names.last().unwrap().len() > 240,
        "the deepest is stored under a hash"
    );
    for n in &names {
        f.cells.allocate(cell(n)).await.unwrap();
    }
    let again = restarted(&f);
    let out = again.readopt().await;
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    for n in &names {
        let name = CellName::parse("c", n).unwrap();
        assert!(again.find(&name).is_ok(), "{n} served again");
        assert!(
            f.store.get::<CellRecord>(kinds::CELL, n).unwrap().is_some(),
            "{n} still recorded"
        );
    }
}

/// What a restarted auraed makes of the fixture's records: a second `Cells` on the same
/// tree, spawner and store (`readopt` not run yet).
fn restarted(f: &Fixture) -> Arc<Cells> {
    cells_on(f._dir.path(), &f.tree, &f.spawner, &f.store)
}

/// A `Cells` on the fakes, its directories under `dir`.
fn cells_on(
    dir: &std::path::Path,
    tree: &Arc<FakeTree>,
    spawner: &Arc<FakeSpawner>,
    store: &Store,
) -> Arc<Cells> {
    Arc::new(Cells::new(CellsDeps {
        tree: Ok(tree.clone() as Arc<dyn CgroupTree>),
        spawner: spawner.clone(),
        events: Arc::new(EventBus::default()),
        logs_dir: dir.join("logs"),
        containers_dir: dir.join("containers"),
        cell_dirs: crate::cell::dirs::CellDirs::new(dir.join("cell-dirs")),
        sealed: Arc::new(aurae_sys::memfd::SealedSelf::default()),
        store: Some(store.clone()),
        images: None,
        holder: None,
    }))
}

/// A run call's cell (RunCell: `allocate_for`) whose workload was never recorded — the
/// call's start cut by a crash between the allocation and the workload's record — is
/// freed at the restart, as the failed call would have freed it; one whose workload was
/// recorded stays, and so does one whose workload its owner freed on purpose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_calls_cell_left_without_its_workload_is_freed_at_the_restart() {
    let f = fixture();
    for n in ["cut", "busy", "emptied"] {
        let cells = f.cells.clone();
        super::registry::detached("allocate", move |t| async move {
            cells.allocate_for(cell(n), false, t).await
        })
        .await
        .unwrap();
    }
    for n in ["busy", "emptied"] {
        f.cells
            .run(exe(n, "w", &["/bin/sleep", "30"], Some(1000)), None)
            .await
            .unwrap();
    }
    let r = crate::executable::ExecutableRef {
        cell: CellName::parse("c", "emptied").unwrap(),
        name: Label::parse("n", "w").unwrap(),
    };
    let e = f.cells.executable(&r).unwrap();
    let _ = e.signal(nix::libc::SIGKILL);
    e.wait(Some(Duration::from_secs(10))).await.unwrap();
    f.cells.free_executable(&r).unwrap();
    let again = restarted(&f);
    let out = again.readopt().await;
    let freed: Vec<&String> = out
        .warnings
        .iter()
        .filter(|w| w.contains("never recorded"))
        .collect();
    assert_eq!(freed.len(), 1, "{:?}", out.warnings);
    assert!(freed[0].contains("\"cut\""), "{freed:?}");
    assert!(!f.tree.has("cut"), "its cgroup is gone");
    assert!(
        f.store
            .get::<CellRecord>(kinds::CELL, "cut")
            .unwrap()
            .is_none()
    );
    assert!(!out.cells.contains("cut"));
    for n in ["busy", "emptied"] {
        assert!(
            again.find(&CellName::parse("c", n).unwrap()).is_ok(),
            "{n} kept"
        );
        assert!(f.tree.has(n));
    }
}
