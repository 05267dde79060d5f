//! Boots a kernel with the serial console on stdout, for manual checks:
//!
//! ```text
//! cargo run -p aurae-vmm --example run_vm -- KERNEL [INITRAMFS] [--secs N] [--mem MIB]
//!     [--vcpus N] [--cmdline "..."]
//! ```
//!
//! Stops the VM after `--secs` (default 30) and prints how it ended and the boot time.

use std::{path::PathBuf, time::Duration};

use aurae_vmm::{Vm, VmConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut paths = Vec::new();
    let mut secs = 30u64;
    let mut mem_mib = 256u64;
    let mut vcpus = 1u8;
    let mut cmdline = String::from(
        "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd",
    );
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--secs" => secs = value()?.parse()?,
            "--mem" => mem_mib = value()?.parse()?,
            "--vcpus" => vcpus = value()?.parse()?,
            "--cmdline" => cmdline = value()?,
            _ => paths.push(PathBuf::from(a)),
        }
    }
    let mut paths = paths.into_iter();
    let kernel = paths.next().ok_or(
        "usage: run_vm KERNEL [INITRAMFS] [--secs N] [--mem MIB] [--vcpus N] [--cmdline ...]",
    )?;
    let vm = Vm::new(VmConfig {
        kernel,
        initramfs: paths.next(),
        cmdline,
        vcpus,
        mem_bytes: mem_mib << 20,
        serial_out: Box::new(std::io::stdout()),
        ..Default::default()
    })?;
    let handle = vm.handle();
    let stopper = handle.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(secs));
        stopper.stop();
    });
    let exit = vm.run()?;
    eprintln!(
        "\nrun_vm: exit {exit:?}, {} port I/O exits, boot time {:?}",
        handle.io_exits(),
        handle.boot_time()
    );
    Ok(())
}
