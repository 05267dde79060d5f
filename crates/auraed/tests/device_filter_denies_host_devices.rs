//! Host tier (root, cgroup v2): every cell carries a cgroup device filter. A plain
//! executable running as uid 0 with every capability (CAP_MKNOD included), in a cell of
//! its own namespaces or in one sharing all of the host's, can neither make nor open a
//! block device node: `EPERM` from the device cgroup, not from a missing capability (it
//! may still make an allowed character node). `/dev/null` and `/dev/urandom` still work.
//! Nothing is read from or written to any device; every node made is removed.
//!
//! `/dev/kvm` is denied like any device unless the cell asks for it (`devices.kvm`) and the
//! caller's grant has `allow_kvm`; a child cell needs a parent that has it; a container
//! may not ask.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    os::{fd::AsFd, unix::fs::PermissionsExt},
    path::{Path, PathBuf},
};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    Daemon, DaemonOptions, TRUST_DOMAIN,
    tier::{self, Tier},
    workload,
};

/// A private directory under the host's /tmp (which cells see) holding a block node
/// `blk` (loop device 7:0) made by the test, outside any cell. Removed on drop.
struct Nodes {
    dir: PathBuf,
}

impl Nodes {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("aurae-{test}-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        nix::sys::stat::mknod(
            &dir.join("blk"),
            nix::sys::stat::SFlag::S_IFBLK,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(7, 0),
        )
        .unwrap();
        Self { dir }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Each line `key: <what happened>`; the node is opened for reading only, never read.
fn script(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"
exec 2>&1
echo "caps: $(grep CapEff /proc/self/status | cut -f2)"
echo "uid: $(id -u)"
echo "open-blk: $( (exec 3< {d}/blk) 2>&1 && echo opened)"
if [ -b /dev/loop0 ]; then echo "open-loop0: $( (exec 3< /dev/loop0) 2>&1 && echo opened)"; else echo "open-loop0: absent"; fi
echo "mknod-blk: $(mknod {d}/made-blk b 7 0 2>&1 && echo made)"
echo "mknod-chr: $(mknod {d}/made-null c 1 3 2>&1 && echo made)"
echo "mknod-mem: $(mknod {d}/made-mem c 1 1 2>&1 && echo made)"
echo "devnull: $( (exec 3< /dev/null; echo x > /dev/null) 2>&1 && echo ok)"
echo "urandom: $(head -c 4 /dev/urandom | wc -c)"
"#
    )
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
}

async fn probe(c: &Client, cell: &str, nodes: &Nodes) -> String {
    let (st, out) = workload::run_to_end(
        c,
        pb::Executable {
            cell: cell.into(),
            name: "probe".into(),
            argv: vec!["/bin/sh".into(), "-c".into(), script(&nodes.dir)],
            env: [(
                "PATH".to_string(),
                "/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            )]
            .into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    println!("{cell}:\n{out}");
    assert!(
        matches!(
            st.exit.as_ref().and_then(|e| e.how),
            Some(pb::exit_status::How::Code(0))
        ),
        "{st:?} {out}"
    );
    out
}

fn check(cell: &str, out: &str, nodes: &Nodes) {
    let d = nodes.dir.display();
    // uid 0 with CAP_MKNOD (bit 27) in its effective set: the refusals below are the
    // device cgroup's, not a missing capability's.
    assert_eq!(field(out, "uid"), "0", "{cell}");
    let caps = u64::from_str_radix(field(out, "caps"), 16).unwrap();
    assert_ne!(caps & (1 << 27), 0, "{cell}: CAP_MKNOD expected: {out}");
    assert!(
        field(out, "open-blk").ends_with(&format!("cannot open {d}/blk: Operation not permitted")),
        "{cell}: {out}"
    );
    let loop0 = field(out, "open-loop0");
    assert!(
        loop0 == "absent" || loop0.ends_with("cannot open /dev/loop0: Operation not permitted"),
        "{cell}: {out}"
    );
    assert_eq!(
        field(out, "mknod-blk"),
        format!("mknod: {d}/made-blk: Operation not permitted"),
        "{cell}"
    );
    assert_eq!(
        field(out, "mknod-mem"),
        format!("mknod: {d}/made-mem: Operation not permitted"),
        "{cell}: /dev/mem's numbers are refused too"
    );
    assert_eq!(field(out, "mknod-chr"), "made", "{cell}: c 1:3 is allowed");
    assert_eq!(field(out, "devnull"), "ok", "{cell}");
    assert_eq!(field(out, "urandom"), "4", "{cell}");
    assert!(!nodes.dir.join("made-blk").exists());
    assert!(!nodes.dir.join("made-mem").exists());
    let _ = std::fs::remove_file(nodes.dir.join("made-null"));
}

fn programs_on(dir: &Path) -> u32 {
    let f = std::fs::File::open(dir).unwrap();
    aurae_sys::bpf::device_programs_attached(f.as_fd()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_process_in_any_cell_can_neither_make_nor_open_block_devices() {
    let test = "a_root_process_in_any_cell_can_neither_make_nor_open_block_devices";
    if !tier::check(test, Tier::Host, tier::needs_cells()) {
        return;
    }
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions::default(),
    )
    .await
    .unwrap();
    let c = d.client("admin").await.unwrap();
    let nodes = Nodes::new("devfilter");
    // The control: outside any cell, root opens the node (not reading it). Without a
    // loop driver the open reaches the driver and fails otherwise, never with EPERM.
    match std::fs::File::open(nodes.dir.join("blk")) {
        Ok(_) => {}
        Err(e) => assert_ne!(
            e.raw_os_error(),
            Some(nix::libc::EPERM),
            "outside a cell: {e}"
        ),
    }
    let cgroup = d.cgroup.clone().unwrap();
    // A cell with its own namespaces, a child of it, and one sharing all of the host's.
    for (name, ns) in [
        ("own", None),
        ("own/child", None),
        (
            "host",
            Some(pb::CellNamespaces {
                share_host_pid: true,
                share_host_net: true,
                share_host_ipc: true,
                share_host_uts: true,
                share_host_mount: true,
                share_host_cgroup: true,
                user_namespace: false,
            }),
        ),
    ] {
        c.cells()
            .allocate(pb::Cell {
                name: name.into(),
                namespaces: ns,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("allocate {name}: {e:?}"));
        assert_eq!(
            programs_on(&cgroup.join(name)),
            1,
            "{name}: one device filter on the cell's directory"
        );
        let out = probe(&c, name, &nodes).await;
        check(name, &out, &nodes);
    }
    for name in ["own", "host"] {
        c.cells()
            .free(pb::NameRef { name: name.into() })
            .await
            .unwrap();
    }
    drop(nodes);
    assert!(
        !std::env::temp_dir()
            .join(format!("aurae-devfilter-{}", std::process::id()))
            .exists()
    );
}

/// What opening /dev/kvm read-write gives in `cell` (its processes share the host's /dev).
async fn open_kvm(c: &Client, cell: &str, n: &str) -> String {
    let (_, out) = workload::run_to_end(
        c,
        pb::Executable {
            cell: cell.into(),
            name: n.into(),
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "(exec 3<> /dev/kvm) 2>&1 && echo OPENED".into(),
            ],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_kvm_is_opened_only_by_cells_that_asked_with_a_grant_that_allows_it() {
    let test = "dev_kvm_is_opened_only_by_cells_that_asked_with_a_grant_that_allows_it";
    let missing = tier::needs_cells().or_else(|| {
        (!Path::new("/dev/kvm").exists()).then(|| "no /dev/kvm on this host".to_owned())
    });
    if !tier::check(test, Tier::Host, missing) {
        return;
    }
    let policy = format!(
        "[[grant]]\nid = \"spiffe://{TRUST_DOMAIN}/operator/admin\"\nmethods = [\"*\"]\nnames = [\"*\"]\n\
         allow_kvm = true\nallow_uid_zero = true\nuids = [\"1-2147483647\"]\ngids = [\"1-2147483647\"]\n\n\
         [[grant]]\nid = \"spiffe://{TRUST_DOMAIN}/operator/alice\"\nmethods = [\"*\"]\nnames = [\"team-a\"]\n"
    );
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            policy: Some(policy),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let admin = d.client("admin").await.unwrap();
    let alice = d.client("alice").await.unwrap();
    // The control: outside any cell, the test opens it.
    assert!(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
        "the test itself opens /dev/kvm"
    );
    let kvm = |name: &str, kvm: bool| pb::Cell {
        name: name.into(),
        devices: Some(pb::CellDevices { kvm }),
        ..Default::default()
    };
    // Asked, with the grant: opened; the same cell's child that asks too: opened.
    let st = admin
        .cells()
        .allocate(kvm("vmm", true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.devices, Some(pb::CellDevices { kvm: true }), "{st:?}");
    admin
        .cells()
        .allocate(kvm("vmm/inner", true))
        .await
        .unwrap();
    // Not asked: denied by the device cgroup, even below a cell that has it.
    admin.cells().allocate(kvm("plain", false)).await.unwrap();
    admin
        .cells()
        .allocate(kvm("vmm/plain", false))
        .await
        .unwrap();
    for (cell, opened) in [
        ("vmm", true),
        ("vmm/inner", true),
        ("plain", false),
        ("vmm/plain", false),
    ] {
        let out = open_kvm(&admin, cell, "probe").await;
        if opened {
            assert!(out.contains("OPENED"), "{cell}: {out}");
        } else {
            assert!(
                !out.contains("OPENED") && out.contains("Operation not permitted"),
                "{cell}: {out}"
            );
        }
    }
    // A child asking under a parent without it: refused, naming the field.
    let e = admin
        .cells()
        .allocate(kvm("plain/vm", true))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("devices.kvm"), "{e:?}");
    // A grant without allow_kvm: refused, naming it; nothing made.
    let e = alice
        .cells()
        .allocate(kvm("team-a", true))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("allow_kvm"), "{e:?}");
    assert!(!d.cgroup.clone().unwrap().join("team-a").exists());
    // A container may not ask (its /dev holds no /dev/kvm).
    let e = admin
        .runtime()
        .run_cell(pb::Cell {
            container: Some(pb::Container {
                image: "127.0.0.1:1/none:latest".into(),
                ..Default::default()
            }),
            ..kvm("ct", true)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("devices.kvm"), "{e:?}");
    for name in ["vmm", "plain"] {
        admin
            .cells()
            .free(pb::NameRef { name: name.into() })
            .await
            .unwrap();
    }
}
