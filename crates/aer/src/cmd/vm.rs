//! `aer vm …`: RunVirtualMachine and the VirtualMachines service.

use aurae_client::Client;
use aurae_proto::runtime::v0::{self as pb, virtual_machines_client::VirtualMachinesClient};
use clap::{Args, Subcommand};
use serde_json::json;
use tonic::{Status, transport::Channel};

use super::{
    exit,
    lifecycle::{self, Lifecycle, kind},
    logs_from_start, phase, stream_logs,
};
use crate::{
    output::{Format, Row, print},
    progress::{self, Watch},
    units::parse_size,
};

#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// Boot a microVM and wait until it runs (a spinner on a terminal), e.g.
    /// `aer vm run web --kernel /srv/vm-images/vmlinuz --memory 512M --net`.
    Run(RunArgs),
    #[command(flatten)]
    Lifecycle(Lifecycle),
    /// A VM's serial console: what it printed so far, then more with -f.
    Console {
        /// The VM's name, e.g. web.
        name: String,
        /// Keep the stream open and print new console output as it comes.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Stop a running VM and store its snapshot (its vCPUs', devices' and memory's state)
    /// on auraed's machine, e.g. `aer vm snapshot web web-warm`; `aer vm run NAME
    /// --snapshot web-warm` restores it.
    Snapshot {
        /// The running VM, e.g. web.
        name: String,
        /// The snapshot's name, a DNS label unique on this auraed, e.g. web-warm.
        snapshot: String,
    },
    /// The stored snapshots you may use.
    Snapshots {
        /// Only snapshots whose name starts with this, e.g. web-.
        #[arg(long, default_value = "", hide_default_value = true)]
        prefix: String,
    },
    /// Remove a stored snapshot (VMs restored from it run on), e.g. `aer vm rm-snapshot web-warm`.
    RmSnapshot {
        /// The snapshot's name, e.g. web-warm.
        snapshot: String,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The VM's name, a DNS label unique on this auraed, e.g. web.
    name: String,
    /// Guest kernel (bzImage or vmlinux), an absolute path on auraed's machine, e.g.
    /// /srv/vm-images/vmlinuz (required unless --snapshot).
    #[arg(long, value_name = "PATH", required_unless_present = "snapshot")]
    kernel: Option<String>,
    /// Restore this stored snapshot instead of booting a kernel (its size, command line
    /// and CPU template are the snapshot's), e.g. web-warm.
    #[arg(
        long,
        value_name = "SNAPSHOT",
        conflicts_with_all = ["kernel", "initramfs", "cmdline", "vcpus", "memory", "cpu_template"]
    )]
    snapshot: Option<String>,
    /// Initramfs, an absolute path on auraed's machine, e.g. /srv/vm-images/initrd
    /// [default: none].
    #[arg(
        long,
        value_name = "PATH",
        default_value = "",
        hide_default_value = true
    )]
    initramfs: String,
    /// Kernel command line, e.g. 'console=ttyS0 reboot=k panic=-1'.
    #[arg(long, value_name = "ARGS", default_value = "console=ttyS0")]
    cmdline: String,
    /// Virtual CPUs, a count 1..=32, e.g. 2.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u32,
    /// Guest memory in bytes with a K, M, G or T suffix (powers of 1024), a multiple of
    /// 2M and at least 32M, e.g. 512M or 2G.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "256M")]
    memory: u64,
    /// A block device `PATH[:rw]` under one of auraed's --vm-image-root (repeatable;
    /// the first is /dev/vda), e.g. /srv/vm-images/data.img:rw. Read-only unless `:rw`
    /// (which needs a grant with allow_writable_drives and the path in its volumes);
    /// `:ro` is accepted.
    #[arg(long = "drive", value_name = "PATH[:rw]")]
    drives: Vec<String>,
    /// Attach a network interface (a TAP on auraed's bridge; the address is leased).
    #[arg(long)]
    net: bool,
    /// What CPUID the guest sees: normalized (the set a microVM needs, the same on every
    /// host of one vendor) or host (KVM's supported set as it is), e.g. host.
    #[arg(long, value_name = "TEMPLATE", default_value = "normalized")]
    cpu_template: String,
}

impl RunArgs {
    fn proto(self) -> pb::VirtualMachine {
        let drives = self.drives.iter().map(|d| drive(d)).collect();
        let interfaces = if self.net {
            vec![pb::NetworkInterface::default()]
        } else {
            Vec::new()
        };
        if let Some(snapshot) = self.snapshot {
            // The snapshot decides the rest (clap refused them on the command line).
            return pb::VirtualMachine {
                name: self.name,
                snapshot,
                drives,
                interfaces,
                ..Default::default()
            };
        }
        pb::VirtualMachine {
            name: self.name,
            kernel_path: self.kernel.unwrap_or_default(),
            initramfs_path: self.initramfs,
            cmdline: self.cmdline,
            vcpus: self.vcpus,
            memory_bytes: self.memory,
            drives,
            interfaces,
            cpu_template: self.cpu_template,
            snapshot: String::new(),
        }
    }
}

/// `PATH`, `PATH:ro` (read-only either way) or `PATH:rw` (writable).
fn drive(d: &str) -> pb::Drive {
    match (d.strip_suffix(":rw"), d.strip_suffix(":ro")) {
        (Some(p), _) => pb::Drive {
            path: p.to_owned(),
            read_only: false,
            writable: true,
        },
        (None, p) => pb::Drive {
            path: p.unwrap_or(d).to_owned(),
            read_only: false,
            writable: false,
        },
    }
}

fn vm_row(s: &pb::VirtualMachineStatus) -> Row {
    vec![
        ("name", json!(s.name)),
        ("phase", phase(s.phase)),
        ("vmm_pid", json!(s.vmm_pid)),
        ("addresses", json!(s.addresses)),
        ("exit", exit(s.exit.as_ref())),
        ("message", json!(s.message)),
    ]
}

fn snapshot_row(s: &pb::VirtualMachineSnapshot) -> Row {
    vec![
        ("name", json!(s.name)),
        ("vm", json!(s.vm)),
        ("vcpus", json!(s.vcpus)),
        ("memory_bytes", json!(s.memory_bytes)),
        ("drives", json!(s.drives)),
        ("interfaces", json!(s.interfaces)),
        ("state_bytes", json!(s.state_bytes)),
        (
            "took_ms",
            json!(
                s.took
                    .as_ref()
                    .map_or(0.0, |d| d.seconds as f64 * 1e3 + f64::from(d.nanos) / 1e6)
            ),
        ),
        ("cpu_template", json!(s.cpu_template)),
    ]
}

kind!(
    VirtualMachinesClient<Channel>,
    pb::VirtualMachineStatus,
    virtual_machines,
    vm_row
);

pub async fn run(c: &Client, cmd: VmCmd, fmt: Format) -> Result<(), Status> {
    match cmd {
        VmCmd::Run(a) => {
            let vm = a.proto();
            let name = vm.name.clone();
            let watch = Watch {
                what: format!("booting vm {name}"),
                first_phase: "starting its VMM",
                name: &name,
                kinds: vec![pb::Kind::VirtualMachine],
                then: None,
            };
            let s = progress::wait(c, watch, c.runtime().run_virtual_machine(vm)).await?;
            print(fmt, &[vm_row(&s.into_inner())], true);
        }
        VmCmd::Lifecycle(cmd) => lifecycle::run(c.virtual_machines(), cmd, fmt).await?,
        VmCmd::Console { name, follow } => {
            let logs = c
                .virtual_machines()
                .console(logs_from_start(name, follow))
                .await?;
            stream_logs(logs.into_inner()).await?;
        }
        VmCmd::Snapshot { name, snapshot } => {
            let s = c
                .virtual_machines()
                .snapshot(pb::SnapshotRequest { name, snapshot })
                .await?
                .into_inner();
            print(fmt, &[snapshot_row(&s)], true);
        }
        VmCmd::Snapshots { prefix } => {
            let l = c
                .virtual_machines()
                .list_snapshots(pb::ListRequest {
                    name_prefix: prefix,
                })
                .await?
                .into_inner();
            let rows: Vec<Row> = l.snapshots.iter().map(snapshot_row).collect();
            print(fmt, &rows, false);
        }
        VmCmd::RmSnapshot { snapshot } => {
            c.virtual_machines()
                .remove_snapshot(pb::NameRef { name: snapshot })
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Command, parse};

    #[test]
    fn vm_run_reads_drives_memory_and_net() {
        let line = "vm run web --kernel /k --drive /a:rw --drive /b:ro --drive /c --net";
        let Command::Vm(VmCmd::Run(a)) = parse(line).unwrap() else {
            panic!("not vm run")
        };
        let vm = a.proto();
        assert_eq!((vm.name.as_str(), vm.kernel_path.as_str()), ("web", "/k"));
        assert_eq!(vm.cmdline, "console=ttyS0");
        assert_eq!((vm.vcpus, vm.memory_bytes), (1, 256 << 20));
        let drives: Vec<_> = vm
            .drives
            .iter()
            .map(|d| (d.path.as_str(), d.writable))
            .collect();
        assert_eq!(drives, [("/a", true), ("/b", false), ("/c", false)]);
        assert!(vm.drives.iter().all(|d| !d.read_only));
        assert_eq!(vm.interfaces.len(), 1);
    }

    #[test]
    fn vm_run_from_a_snapshot_sends_only_what_the_snapshot_does_not_decide() {
        let Command::Vm(VmCmd::Run(a)) = parse("vm run r1 --snapshot warm --net").unwrap() else {
            panic!("not vm run")
        };
        let vm = a.proto();
        assert_eq!((vm.name.as_str(), vm.snapshot.as_str()), ("r1", "warm"));
        assert_eq!((vm.kernel_path.as_str(), vm.cmdline.as_str()), ("", ""));
        assert_eq!((vm.vcpus, vm.memory_bytes), (0, 0));
        assert!(vm.cpu_template.is_empty());
        assert_eq!(vm.interfaces.len(), 1);
        // What the snapshot decides cannot be asked for, and a kernel or a snapshot is needed.
        assert!(parse("vm run r1 --snapshot warm --vcpus 2").is_err());
        assert!(parse("vm run r1 --snapshot warm --kernel /k").is_err());
        assert!(parse("vm run r1").is_err());
        assert!(matches!(
            parse("vm snapshot web warm").unwrap(),
            Command::Vm(VmCmd::Snapshot { .. })
        ));
        assert!(matches!(
            parse("vm rm-snapshot warm").unwrap(),
            Command::Vm(VmCmd::RmSnapshot { .. })
        ));
        assert!(matches!(
            parse("vm snapshots --prefix web-").unwrap(),
            Command::Vm(VmCmd::Snapshots { .. })
        ));
    }

    #[test]
    fn vm_lifecycle_and_console_parse() {
        assert!(matches!(
            parse("vm stop web").unwrap(),
            Command::Vm(VmCmd::Lifecycle(Lifecycle::Stop { name, .. })) if name == "web"
        ));
        assert!(matches!(
            parse("vm list").unwrap(),
            Command::Vm(VmCmd::Lifecycle(Lifecycle::List))
        ));
        assert!(matches!(
            parse("vm console web -f").unwrap(),
            Command::Vm(VmCmd::Console { follow: true, .. })
        ));
        assert!(parse("vm run web").is_err(), "--kernel is required");
    }
}
