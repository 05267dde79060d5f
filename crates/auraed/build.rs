//! Links `auraed` with packed relative relocations (`DT_RELR`, `-z pack-relative-relocs`)
//! where the toolchain has them.
//!
//! auraed is a position-independent executable with ~25 000 relative relocations: as
//! `RELA` entries they are a 600 KiB table the loader reads at every start, and those
//! pages stay resident in every process that runs the binary — auraed, its output holder,
//! every VMM (where they were an eighth of its memory overhead). As `RELR` they are a few
//! KiB. Needs glibc ≥ 2.36 to run (Debian 12 has it) and binutils ≥ 2.38 to link; the
//! flag is probed with the C compiler that links Rust binaries here, and left out (with a
//! warning) where it does not link.

use std::{env, path::PathBuf, process::Command};

const FLAG: &str = "-Wl,-z,pack-relative-relocs";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target = env::var("TARGET").unwrap_or_default();
    if !(target.contains("linux") && target.ends_with("-gnu")) {
        return;
    }
    if links_with_relr() {
        println!("cargo:rustc-link-arg-bins={FLAG}");
    } else {
        println!(
            "cargo:warning=the C compiler/linker does not take {FLAG}: auraed is linked with RELA relocations (larger resident memory per process)"
        );
    }
}

/// Whether `cc` links a program with the flag and the result runs (the loader knows
/// `DT_RELR`).
fn links_with_relr() -> bool {
    let Some(out) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        return false;
    };
    let src = out.join("relr_probe.c");
    let bin = out.join("relr_probe");
    if std::fs::write(
        &src,
        "static int x; int *p = &x; int main(void) { return *p; }\n",
    )
    .is_err()
    {
        return false;
    }
    let cc = env::var("CC").unwrap_or_else(|_| "cc".into());
    let linked = Command::new(&cc)
        .args(["-fPIE", "-pie", FLAG, "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .is_ok_and(|s| s.success());
    // Cross builds cannot run the probe; trust the link there.
    let native = env::var("HOST").ok() == env::var("TARGET").ok();
    linked && (!native || Command::new(&bin).status().is_ok_and(|s| s.success()))
}
