//! Links `auraed` with packed relative relocations (`DT_RELR`, `-z pack-relative-relocs`)
//! where the toolchain has them.
//!
//! auraed is a position-independent executable with ~25 000 relative relocations: as
//! `RELA` entries they are a 600 KiB table the loader reads at every start, and those
//! pages stay resident in every process that runs the binary — auraed, its output holder,
//! every VMM (where they were an eighth of its memory overhead). As `RELR` they are a few
//! KiB. Needs glibc ≥ 2.36 to run (Debian 12 has it) and a linker that knows the flag;
//! probed with the C compiler (a program linked with it must run here), and left out,
//! with a warning, where it does not link or run, and in cross builds.

use std::{env, path::PathBuf, process::Command};

const FLAG: &str = "-Wl,-z,pack-relative-relocs";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CC");
    let target = env::var("TARGET").unwrap_or_default();
    // A cross build's linker and C library are not the ones the probe could check.
    let native = env::var("HOST").ok().as_deref() == Some(target.as_str());
    if !(native && target.contains("linux") && target.ends_with("-gnu")) {
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

/// Whether `cc` links a program with the flag (an older GNU ld only warns that it ignores
/// it: warnings are made fatal) and the result runs (the loader knows `DT_RELR`).
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
        .args(["-fPIE", "-pie", FLAG, "-Wl,--fatal-warnings", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .is_ok_and(|s| s.success());
    linked && Command::new(&bin).status().is_ok_and(|s| s.success())
}
