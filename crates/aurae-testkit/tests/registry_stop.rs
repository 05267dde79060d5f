//! `aurae-registry stop DIR` stops only the registry it started there (by its exact
//! command line, through a pidfd) and removes only a directory it made.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

fn registry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_aurae-registry")
}

fn stop(dir: &Path) -> std::process::Output {
    Command::new(registry_bin())
        .arg("stop")
        .arg(dir)
        .output()
        .unwrap()
}

/// Whether `child` is still running after a moment.
fn alive(child: &mut Child) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(300) {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn stop_spares_a_process_that_only_mentions_the_registry_config() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("reg");
    std::fs::create_dir(&dir).unwrap();
    let cfg = dir.join("registry.yml");
    std::fs::write(&cfg, "version: 0.1\n").unwrap();
    // The pid in DIR/pid was reused by a process whose command line happens to contain the
    // config's path (here: as $0 of a shell): it is not the registry.
    let mut other = Command::new("sh")
        .arg("-c")
        .arg("sleep 30")
        .arg(&cfg)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::fs::write(dir.join("pid"), format!("{}\n", other.id())).unwrap();
    let out = stop(&dir);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let survived = alive(&mut other);
    let _ = other.kill();
    let _ = other.wait();
    assert!(
        survived,
        "stop killed a process that was not the registry: {err}"
    );
    assert!(err.contains("no longer the registry"), "{err}");
}

#[test]
fn stop_spares_a_process_mentioning_the_config_of_a_longer_path() {
    // `stop DIR` with DIR relative: DIR/registry.yml is a suffix of many absolute paths.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("x-reg");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("registry.yml"), "version: 0.1\n").unwrap();
    let mut other = Command::new("sh")
        .arg("-c")
        .arg("sleep 30")
        .arg(dir.join("registry.yml"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let short = tmp.path().join("reg");
    std::fs::create_dir(&short).unwrap();
    std::fs::write(short.join("registry.yml"), "version: 0.1\n").unwrap();
    std::fs::write(short.join("pid"), format!("{}\n", other.id())).unwrap();
    let out = Command::new(registry_bin())
        .arg("stop")
        .arg("reg")
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let survived = alive(&mut other);
    let _ = other.kill();
    let _ = other.wait();
    assert!(
        survived,
        "stop reg killed the process of x-reg: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn stop_removes_only_a_directory_the_registry_made() {
    // A directory with a `pid` file but no registry config is not one `start` made.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("precious");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("pid"), "1\n").unwrap();
    std::fs::write(dir.join("notes.txt"), "keep me\n").unwrap();
    let out = stop(&dir);
    assert!(!out.status.success());
    assert!(
        dir.join("notes.txt").exists(),
        "stop removed a directory that was not a registry's: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("registry.yml"), "{err}");
}
