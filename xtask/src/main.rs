//! `cargo xtask <task>`: the project's automation, in Rust.
//!
//! - `test`: everything CI checks (format, lints, dependency rules, all test tiers this
//!   machine can run), ending with one `N passed, N failed, N skipped` line.
//! - `lint`: format, clippy `-D warnings`, rustdoc `-D warnings`, dependency rules.
//! - `demo`: the README's main job: build, create a dev PKI, start auraed, talk to it with
//!   aer, shut it down.
//! - `setup`: as root, installs what the test tiers need on a fresh Debian machine (the
//!   Debian packages, cargo-fuzz) and prepares the guest tier; `test` runs it first.

use std::{
    env,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("==> {what}");
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Crates that must never be in the dependency tree, and why.
const BANNED: &[(&str, &str)] = &[
    ("aws-lc-rs", "ring is the only crypto provider"),
    ("aws-lc-sys", "ring is the only crypto provider"),
    ("openssl-sys", "ring is the only crypto provider"),
    ("openssl", "ring is the only crypto provider"),
    ("serde_yml", "unsound (RUSTSEC-2025-0068)"),
    ("serde_yaml", "deprecated (RUSTSEC-2024-0320)"),
    ("tokio-tar", "PAX desync (RUSTSEC-2025-0111)"),
];

/// Our crates, and which of our crates each may depend on (normal dependencies).
const ALLOWED_DEPS: &[(&str, &[&str])] = &[
    ("aurae-proto", &[]),
    ("aurae-sys", &[]),
    ("aurae-vmm", &[]),
    ("aurae-identity", &[]),
    ("aurae-client", &["aurae-proto", "aurae-identity"]),
    (
        "auraed",
        &[
            "aurae-proto",
            "aurae-identity",
            "aurae-sys",
            "aurae-vmm",
            "aurae-client",
        ],
    ),
    ("aer", &["aurae-proto", "aurae-identity", "aurae-client"]),
    (
        "aurae-testkit",
        // aurae-sys: pidfds, so its tools signal only the process they checked.
        &["aurae-client", "aurae-identity", "aurae-proto", "aurae-sys"],
    ),
    ("xtask", &[]),
];

/// Checks the dependency graph: banned crates, one-way dependencies between our crates,
/// the testkit only as a dev-dependency, and workspace lints in every crate.
fn check_deps() -> anyhow::Result<()> {
    eprintln!("==> dependency rules");
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--locked"])
        .output()?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut problems = Vec::new();
    let packages = meta["packages"].as_array().context("metadata packages")?;
    for p in packages {
        let name = p["name"].as_str().unwrap_or_default();
        if let Some((_, why)) = BANNED.iter().find(|(b, _)| *b == name) {
            problems.push(format!("banned crate {name} is in the tree: {why}"));
        }
    }
    let members: Vec<&serde_json::Value> =
        packages.iter().filter(|p| p["source"].is_null()).collect();
    for p in &members {
        let name = p["name"].as_str().unwrap_or_default();
        let Some((_, allowed)) = ALLOWED_DEPS.iter().find(|(n, _)| *n == name) else {
            problems.push(format!(
                "crate {name} is not listed in xtask's ALLOWED_DEPS"
            ));
            continue;
        };
        for d in p["dependencies"].as_array().into_iter().flatten() {
            let dep = d["name"].as_str().unwrap_or_default();
            let ours = d["path"].is_string();
            let dev = d["kind"].as_str() == Some("dev");
            if ours && !dev && !allowed.contains(&dep) {
                problems.push(format!(
                    "{name} depends on {dep}: not allowed (dependencies go one way)"
                ));
            }
            if dep == "aurae-testkit" && !dev {
                problems.push(format!("{name} has aurae-testkit as a normal dependency"));
            }
        }
        let manifest = p["manifest_path"].as_str().unwrap_or_default();
        let text = std::fs::read_to_string(manifest).unwrap_or_default();
        if !text.contains("[lints]\nworkspace = true") {
            problems.push(format!("{manifest}: missing `[lints] workspace = true`"));
        }
        // Unsafe code lives in aurae-sys and in aurae-vmm's sys.rs alone: every other
        // crate root forbids it.
        let dir = Path::new(manifest)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        if name == "aurae-vmm" {
            for f in rust_files(&dir.join("src")) {
                let src = std::fs::read_to_string(&f).unwrap_or_default();
                if src.contains("allow(unsafe_code)") && !f.ends_with("src/sys.rs") {
                    problems.push(format!(
                        "{}: unsafe code in aurae-vmm belongs in src/sys.rs",
                        f.display()
                    ));
                }
            }
        }
        for root in ["src/lib.rs", "src/main.rs"] {
            let f = dir.join(root);
            let Ok(src) = std::fs::read_to_string(&f) else {
                continue;
            };
            let forbids = src.contains("#![forbid(unsafe_code)]");
            if name != "aurae-sys" && name != "aurae-vmm" && !forbids {
                problems.push(format!("{}: missing #![forbid(unsafe_code)]", f.display()));
            }
        }
    }
    problems.extend(module_order_problems(&root().join("crates/auraed/src")));
    if problems.is_empty() {
        eprintln!(
            "    {} packages, {} of ours, auraed's module order: ok",
            packages.len(),
            members.len()
        );
        Ok(())
    } else {
        bail!("dependency rules:\n  {}", problems.join("\n  "))
    }
}

/// auraed's modules, bottom layer first: a module may import (`crate::…`) only modules of
/// its own layer or below, so the import circle between cells, containers, executables
/// and VMs cannot come back. Modules not listed (main.rs wiring) are not checked.
const MODULE_LAYERS: &[&[&str]] = &[
    &["spec", "events", "reaper", "store", "config"],
    &["identity"],
    &["workload"],
    &["image"],
    &["container"],
    &["executable"],
    &["cell"],
    &["vm"],
    &["instance", "pod"],
    &["compose"],
    &["api"],
    &["cri"],
    &["server", "pid1"],
];

fn layer_of(module: &str) -> Option<usize> {
    MODULE_LAYERS.iter().position(|l| l.contains(&module))
}

/// The top-level modules `src` (one file) imports as `crate::<module>`, including the
/// items of `use crate::{a::…, b, …}` groups.
fn crate_imports(src: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = src;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: split on commas at brace depth 0.
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.extend(first_ident(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 || !item.contains("::") {
                    item.push(c);
                }
            }
            out.extend(first_ident(&item));
        } else {
            out.extend(first_ident(rest));
        }
    }
    out
}

fn first_ident(s: &str) -> Option<String> {
    let id: String = s
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!id.is_empty() && id != "self").then_some(id)
}

/// Every `crate::<module>` import that goes up a layer in `src_dir` (auraed's src).
fn module_order_problems(src_dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for f in rust_files(src_dir) {
        let rel = f.strip_prefix(src_dir).unwrap_or(&f);
        let module = rel
            .components()
            .next()
            .map(|c| {
                c.as_os_str()
                    .to_string_lossy()
                    .trim_end_matches(".rs")
                    .to_owned()
            })
            .unwrap_or_default();
        let Some(mine) = layer_of(&module) else {
            continue;
        };
        let src = std::fs::read_to_string(&f).unwrap_or_default();
        for m in crate_imports(&src) {
            if let Some(theirs) = layer_of(&m)
                && theirs > mine
            {
                problems.push(format!(
                    "{}: module {module} imports crate::{m}, a layer above it (see MODULE_LAYERS in xtask)",
                    f.display()
                ));
            }
        }
    }
    problems
}

fn lint() -> anyhow::Result<()> {
    run(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    run(
        "cargo clippy -D warnings",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    run(
        "cargo doc -D warnings",
        cargo()
            .args(["doc", "--workspace", "--no-deps", "--locked"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    check_deps()
}

/// Totals from cargo test output.
#[derive(Debug, Default)]
struct Totals {
    passed: u64,
    failed: u64,
    skipped: u64,
    /// What libtest printed under "failures:" for each failing test binary (backtrace
    /// frames left out), printed again at the very end: a CI log's tail shows why.
    failures: Vec<String>,
    /// Every panic message the tests printed (stderr: `--nocapture`), with the test
    /// binary it came from; printed again at the end when a test failed.
    panics: Vec<String>,
}

/// Echoes the tests' stderr and keeps each panic's message (up to its backtrace or
/// note, at most 12 lines) with the binary cargo said it was running.
fn panics_of(err: impl std::io::Read) -> Vec<String> {
    let mut found = Vec::new();
    let mut binary = String::new();
    let mut current: Option<(String, usize)> = None;
    for line in BufReader::new(err).lines().map_while(Result::ok) {
        eprintln!("{line}");
        if let Some(r) = line.trim_start().strip_prefix("Running ") {
            binary = r.to_owned();
        }
        if line.contains("panicked at") {
            if let Some((b, _)) = current.take() {
                found.push(b);
            }
            current = Some((format!("in {binary}:\n{line}\n"), 12));
            continue;
        }
        if let Some((b, left)) = current.as_mut() {
            if line.starts_with("stack backtrace:")
                || line.starts_with("note: ")
                || is_frame(&line)
                || *left == 0
            {
                found.push(std::mem::take(b));
                current = None;
            } else {
                b.push_str(&line);
                b.push('\n');
                *left -= 1;
            }
        }
    }
    found.extend(current.map(|(b, _)| b));
    found
}

/// A backtrace frame line (`  12: std::…` or `at /rustc/…`): left out of the summary.
fn is_frame(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("at ")
        || t.split_once(": ")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn tests() -> anyhow::Result<Totals> {
    eprintln!("==> cargo test --workspace");
    // Every test binary runs even after one fails: one flaky test must not hide the rest.
    let mut child = cargo()
        .args([
            "test",
            "--workspace",
            "--locked",
            "--no-fail-fast",
            "--",
            "--nocapture",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let err = child.stderr.take();
    let panics = std::thread::spawn(move || err.map(panics_of).unwrap_or_default());
    let mut totals = Totals::default();
    let mut failing: Option<String> = None;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if line == "failures:" && failing.is_none() {
                failing = Some(String::new());
            } else if let Some(f) = failing.as_mut()
                && !line.starts_with("test result: ")
                && !is_frame(&line)
            {
                f.push_str(&line);
                f.push('\n');
            }
            if let Some(rest) = line.strip_prefix("test result: ") {
                if let Some(f) = failing.take() {
                    totals.failures.push(f);
                }
                let num = |key: &str| {
                    rest.split(';')
                        .find_map(|part| {
                            part.trim()
                                .strip_suffix(key)?
                                .trim()
                                .rsplit(' ')
                                .next()?
                                .parse::<u64>()
                                .ok()
                        })
                        .unwrap_or(0)
                };
                totals.passed += num("passed");
                totals.failed += num("failed");
            }
            if line.starts_with("SKIP ") {
                totals.skipped += 1;
            }
        }
    }
    let status = child.wait()?;
    totals.panics = panics.join().unwrap_or_default();
    if !status.success() && totals.failed == 0 {
        totals.failed += 1;
    }
    Ok(totals)
}

/// The Debian packages the test tiers use: a C toolchain (ring's assembly); the host
/// tier's tools (python3, iproute2, nsenter from util-linux); the guest tier (qemu,
/// busybox-static; the kernel is fetched by `guest`); a registry on loopback for image
/// pulls (docker-registry); xz for the guest kernel's vmlinux; crun and runc as
/// benchmark peers; curl and jq for the README; the CNI plugins (bridge, host-local, loopback, portmap) for the CRI's pod networks.
const PACKAGES: &[&str] = &[
    "build-essential",
    "pkg-config",
    "ca-certificates",
    "python3",
    "iproute2",
    "util-linux",
    "qemu-system-x86",
    "busybox-static",
    // `xz`, to take the guest kernel's uncompressed vmlinux out of its bzImage.
    "xz-utils",
    "crun",
    "runc",
    "docker-registry",
    "containernetworking-plugins",
    // The README walkthrough's HTTP and JSON tools.
    "curl",
    "jq",
];

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// The packages of `PACKAGES` dpkg does not list as installed.
fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| o.stdout.ends_with(b"install ok installed"))
        })
        .collect()
}

fn have_nightly() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn have_cargo_fuzz() -> bool {
    Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Makes this machine able to run every tier: as root, installs the missing Debian
/// packages and cargo-fuzz and prepares the guest tier. What it cannot do it says, with
/// the reason, and the tests that need it print SKIP with the same reason. Returns the
/// problems (empty when the machine is ready).
fn setup() -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let root_user = is_root();
    let missing = missing_packages();
    if !missing.is_empty() {
        if root_user {
            let list = missing.join(" ");
            eprintln!("==> apt-get install {list}");
            let update = Command::new("apt-get")
                .args(["update", "-qq"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
            if !update.is_ok_and(|s| s.success()) {
                problems.push("apt-get update failed".to_owned());
            }
            let install = Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
            if !install.is_ok_and(|s| s.success()) {
                problems.push(format!("apt-get install {list} failed"));
            }
        } else {
            problems.push(format!(
                "not root: cannot install the Debian packages {} (run `sudo cargo xtask setup`)",
                missing.join(" ")
            ));
        }
    }
    if !have_nightly() {
        problems.push(
            "the nightly toolchain is missing (`rustup toolchain install nightly`): the fuzz smoke will SKIP"
                .to_owned(),
        );
    } else if !have_cargo_fuzz() {
        eprintln!("==> cargo install cargo-fuzz");
        let ok = Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked", "--quiet"])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            problems.push("cargo install cargo-fuzz failed: the fuzz smoke will SKIP".to_owned());
        }
    }
    if root_user {
        if let Err(e) = guest() {
            problems.push(format!(
                "guest artifacts not prepared ({e:#}): guest-tier tests will SKIP unless required"
            ));
        }
    } else {
        problems.push(
            "not root: the host tier (namespaces, cgroups) and the guest tier (QEMU) will SKIP"
                .to_owned(),
        );
    }
    for p in &problems {
        eprintln!("xtask setup: {p}");
    }
    if problems.is_empty() {
        eprintln!("==> setup: this machine can run every tier");
    }
    Ok(problems)
}

fn test() -> anyhow::Result<ExitCode> {
    // Set the machine up first (as root), so a fresh Debian machine runs every tier; the
    // lints need a C toolchain for ring, which setup installs.
    let problems = setup()?;
    lint()?;
    let mut t = tests()?;
    match readme() {
        Ok(r) => {
            t.passed += r.passed;
            t.failed += r.failed;
            t.skipped += r.skipped;
        }
        Err(e) => {
            println!("README walkthrough: {e:#}");
            t.failed += 1;
        }
    }
    match fuzz_smoke(30) {
        Ok(true) => {}
        Ok(false) => t.failed += 1,
        Err(e) => {
            eprintln!("xtask: fuzz smoke: {e:#}");
            t.failed += 1;
        }
    }
    // Why tests failed, again at the end (the log's tail is what CI shows).
    for f in &t.failures {
        println!("==> a failing test binary printed:\n{f}");
    }
    if t.failed > 0 {
        for p in &t.panics {
            println!("==> a panic during the tests (some tests panic on purpose) {p}");
        }
    }
    // The plain closing line CI and people read, after what setup could not do.
    for p in &problems {
        println!("setup: {p}");
    }
    println!(
        "{} passed, {} failed, {} skipped",
        t.passed, t.failed, t.skipped
    );
    Ok(if t.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A fenced `sh` block of README.md: where it starts, its text, and why it is not run
/// (the HTML comment `<!-- not run: REASON -->` on the line before its fence).
#[derive(Debug, PartialEq)]
struct Block {
    line: usize,
    text: String,
    not_run: Option<String>,
}

fn sh_blocks(readme: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut prev = "";
    let mut open: Option<Block> = None;
    for (i, l) in readme.lines().enumerate() {
        match &mut open {
            Some(b) if l.trim_start().starts_with("```") => {
                out.push(std::mem::replace(
                    b,
                    Block {
                        line: 0,
                        text: String::new(),
                        not_run: None,
                    },
                ));
                open = None;
            }
            Some(b) => {
                b.text.push_str(l);
                b.text.push('\n');
            }
            None if l.trim() == "```sh" => {
                let not_run = prev
                    .trim()
                    .strip_prefix("<!-- not run:")
                    .and_then(|r| r.strip_suffix("-->"))
                    .map(|r| r.trim().to_owned());
                open = Some(Block {
                    line: i + 1,
                    text: String::new(),
                    not_run,
                });
            }
            None => {}
        }
        prev = l;
    }
    out
}

/// Paths the walkthrough writes, each under a private tmpfs while it runs.
const README_SCRATCH: &[&str] = &[
    "/tmp/aurae",
    "/run/aurae",
    "/var/lib/aurae",
    "/srv",
    "/etc/aurae",
];

/// Runs README.md's shell blocks as written, in order, as one bash session (`set -euo
/// pipefail`) from the repository root: every command a newcomer copies must work. It runs
/// as root in new mount, network and PID namespaces (a tmpfs over each of
/// `README_SCRATCH`, only loopback, and everything it started dies with it), and removes
/// the cgroups its auraed made. Blocks marked `<!-- not run: REASON -->` are listed with
/// their reason. Returns (blocks passed, blocks failed, skipped).
fn readme() -> anyhow::Result<Totals> {
    let text = std::fs::read_to_string(root().join("README.md"))?;
    let blocks = sh_blocks(&text);
    let mut t = Totals::default();
    if !is_root() {
        println!("SKIP README walkthrough: needs root (cells, namespaces)");
        t.skipped += 1;
        return Ok(t);
    }
    // auraed's default cgroup root, found as auraed finds it: `aurae` under the first of
    // /sys/fs/cgroup and /sys/fs/cgroup/unified that is a cgroup2 mount (a directory named
    // `unified` on a pure v2 host is a cgroup, not the mount).
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let Some(cg) = cgroup2_mount(&mounts).map(|m| m.join("aurae")) else {
        bail!(
            "no cgroup2 mount at /sys/fs/cgroup or /sys/fs/cgroup/unified: auraed cannot run cells here"
        );
    };
    if cg.exists() {
        bail!(
            "{} exists (a real auraed's cells?): the README walkthrough uses auraed's default cgroup root and will not share it",
            cg.display()
        );
    }
    let mut script = String::from("set -euo pipefail\nip link set lo up\n");
    for d in README_SCRATCH {
        // auraed wants the directories of its socket and its state private.
        let mode = if matches!(*d, "/run/aurae" | "/var/lib/aurae") {
            "0700"
        } else {
            "0755"
        };
        script.push_str(&format!(
            "mkdir -p {d} && mount -t tmpfs -o mode={mode} readme {d}\n"
        ));
    }
    let mut made = Vec::new();
    for d in README_SCRATCH {
        if !Path::new(d).exists() {
            made.push(*d);
        }
    }
    let mut run_blocks = 0;
    for b in &blocks {
        let first = b.text.lines().next().unwrap_or("");
        match &b.not_run {
            Some(why) => println!("README.md:{} not run ({why}): {first}", b.line),
            None => {
                run_blocks += 1;
                script.push_str(&format!(
                    "echo '==> README.md:{}: {}' >&2\n{}echo 'README.md:{} ok'\n",
                    b.line,
                    first.replace('\'', ""),
                    b.text,
                    b.line
                ));
            }
        }
    }
    let file = root().join("target/readme-walkthrough.sh");
    std::fs::write(&file, &script)?;
    eprintln!(
        "==> README walkthrough: {run_blocks} blocks as one bash session ({})",
        file.display()
    );
    // --kill-child: should unshare die (xtask killed), the walkthrough's PID 1 gets SIGKILL
    // and everything it started goes with it.
    let mut child = Command::new("unshare")
        .args([
            "--mount",
            "--net",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
            "--",
        ])
        .arg("bash")
        .arg("-x")
        .arg(&file)
        .current_dir(root())
        .env("PS4", "+ ")
        .stdout(Stdio::piped())
        .spawn()
        .context("unshare (util-linux)")?;
    // Nothing between here and the clean-up may return early: a walkthrough that printed
    // bytes that are not UTF-8 once ended xtask here, leaving its cgroups on the host.
    let ok = child
        .stdout
        .take()
        .map_or(0, |out| echo_and_count_ok(BufReader::new(out)));
    let status = child.wait();
    // The PID namespace took every process with it; the cgroups stay: remove them.
    remove_cgroup_tree(&cg);
    for d in made {
        let _ = std::fs::remove_dir(d);
    }
    t.passed = ok;
    let status = match status {
        Ok(s) if s.success() && ok == run_blocks => None,
        Ok(s) => Some(s.to_string()),
        Err(e) => Some(format!("waiting for it: {e}")),
    };
    if let Some(status) = status {
        println!("README walkthrough failed ({status}) after {ok} of {run_blocks} blocks");
        t.failed += 1;
    } else {
        println!("README walkthrough: {ok} blocks ran as written");
    }
    Ok(t)
}

/// The first of /sys/fs/cgroup and /sys/fs/cgroup/unified that `mounts` (the text of
/// /proc/self/mounts) lists as a cgroup2 mount: where auraed puts its default cgroup root.
fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    let is_cgroup2 = |dir: &str| {
        mounts.lines().any(|l| {
            let mut f = l.split_whitespace().skip(1);
            f.next() == Some(dir) && f.next() == Some("cgroup2")
        })
    };
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .find(|d| is_cgroup2(d))
        .map(PathBuf::from)
}

/// Prints the walkthrough's output line by line (bytes that are not UTF-8 shown as U+FFFD,
/// never an error) and counts the `README.md:N ok` lines; ends at EOF or a read error.
fn echo_and_count_ok(mut r: impl BufRead) -> u64 {
    let mut ok = 0;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return ok,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches('\n');
        println!("{line}");
        if line.starts_with("README.md:") && line.ends_with(" ok") {
            ok += 1;
        }
    }
}

/// Removes a cgroup directory and those below it (deepest first); they must be empty of
/// processes, as they are once the walkthrough's PID namespace is gone.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    if dir.exists() {
        // A cgroup whose last process just died may take a moment to become removable.
        for _ in 0..50 {
            if std::fs::remove_dir(dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("xtask: could not remove {}", dir.display());
    }
}

/// Fuzzes the layer extractor for `secs` seconds (cargo-fuzz, nightly, libFuzzer), from
/// the committed seeds. Prints SKIP when cargo-fuzz or the nightly toolchain is missing.
fn fuzz_smoke(secs: u64) -> anyhow::Result<bool> {
    if !have_cargo_fuzz() {
        println!(
            "SKIP fuzz smoke: cargo-fuzz or the nightly toolchain is missing (cargo install cargo-fuzz --locked)"
        );
        return Ok(true);
    }
    let corpus = root().join("fuzz/corpus/layer_unpack");
    std::fs::create_dir_all(&corpus)?;
    for seed in std::fs::read_dir(root().join("fuzz/seeds"))?.flatten() {
        std::fs::copy(seed.path(), corpus.join(seed.file_name()))?;
    }
    eprintln!("==> fuzzing the layer extractor for {secs} s");
    let status = Command::new("cargo")
        .args([
            "+nightly",
            "fuzz",
            "run",
            "--fuzz-dir",
            "fuzz",
            "layer_unpack",
        ])
        .arg(&corpus)
        .args([
            "--",
            &format!("-max_total_time={secs}"),
            "-rss_limit_mb=2048",
            "-max_len=65536",
        ])
        .env_remove("RUSTUP_TOOLCHAIN")
        .current_dir(root())
        .status()?;
    if status.success() {
        println!("fuzz smoke: layer_unpack ran {secs} s without a crash");
    }
    Ok(status.success())
}

/// Kills the demo daemon if the demo fails half-way.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn demo() -> anyhow::Result<ExitCode> {
    run(
        "cargo build --release",
        cargo().args([
            "build",
            "--release",
            "--locked",
            "-p",
            "auraed",
            "-p",
            "aer",
        ]),
    )?;
    let bin = root().join("target/release");
    let work = root().join("target/demo");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let pki = work.join("pki");
    let socket = work.join("run/auraed.sock");
    let aer = |args: &[&str]| {
        let mut c = Command::new(bin.join("aer"));
        c.arg("--pki-dir")
            .arg(&pki)
            .arg("--socket")
            .arg(&socket)
            .args(args);
        c
    };
    run(
        "aer pki init",
        Command::new(bin.join("aer"))
            .args(["pki", "init", "--dir"])
            .arg(&pki),
    )?;
    let log = std::fs::File::create(work.join("auraed.log"))?;
    eprintln!(
        "==> starting auraed (log: {})",
        work.join("auraed.log").display()
    );
    let mut guard = Guard(Some(
        Command::new(bin.join("auraed"))
            .arg("--pki-dir")
            .arg(&pki)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(work.join("state"))
            .stderr(log)
            .spawn()?,
    ));
    let start = Instant::now();
    run(
        "aer health --wait 20s",
        &mut aer(&["health", "--wait", "20s"]),
    )
    .with_context(|| {
        format!(
            "auraed did not answer health; see {}",
            work.join("auraed.log").display()
        )
    })?;
    eprintln!("==> auraed answered health after {:?}", start.elapsed());
    run("aer info", &mut aer(&["info"]))?;
    // A real workload: a cell with its own namespaces, a process in it, its output and
    // exit status. Cells need root and a cgroup v2 hierarchy.
    if is_root() {
        run(
            "aer cell allocate demo",
            &mut aer(&["cell", "allocate", "demo"]),
        )?;
        // In the foreground: its output streams to ours and aer exits with its exit
        // code, 3 here (125 would be aer's own failure).
        let what = "aer run --cell demo --name hello -- /bin/sh -c '...; exit 3'";
        eprintln!("==> {what}");
        let status = aer(&[
            "run",
            "--cell",
            "demo",
            "--name",
            "hello",
            "--",
            "/bin/sh",
            "-c",
            "echo hello from $(hostname), pid $$ in a cell; exit 3",
        ])
        .status()
        .with_context(|| format!("running {what}"))?;
        if status.code() != Some(3) {
            bail!("{what}: expected the workload's exit code 3, got {status}");
        }
        eprintln!("==> aer exited 3: the workload's own exit code, as expected");
        run(
            "aer executable get demo/hello",
            &mut aer(&["executable", "get", "demo/hello"]),
        )?;
        run("aer cell free demo", &mut aer(&["cell", "free", "demo"]))?;
    } else {
        eprintln!("==> skipping the cell workload: cells need root");
    }
    run("aer shutdown", &mut aer(&["shutdown"]))?;
    if let Some(mut c) = guard.0.take() {
        let status = c.wait()?;
        eprintln!("==> auraed exited: {status}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Kernel modules the guest loads, in dependency order (paths below `kernel/`).
const GUEST_MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci",
    "net/core/failover",
    "drivers/net/net_failover",
    "drivers/net/virtio_net",
    // Containers' roots.
    "fs/overlayfs/overlay",
    // Nested KVM for microVMs (QEMU TCG `-cpu max` emulates AMD SVM).
    "virt/lib/irqbypass",
    "arch/x86/kvm/kvm",
    "drivers/crypto/ccp/ccp",
    "arch/x86/kvm/kvm-amd",
    // The microVMs' network: a bridge and TAP devices.
    "net/llc/llc",
    "net/802/stp",
    "net/bridge/bridge",
    "drivers/net/tun",
    // Cell-isolated instances: a veth pair each.
    "drivers/net/veth",
];

/// The modules a microVM instance's kernel needs (`auraed --instance-modules`): its
/// network and a template's handover drive over virtio-mmio, and a bridge and veths for its own cell-isolated instances.
const INSTANCE_MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_mmio",
    // Its console for auraed's output (hvc0: a buffer per exit; the UART takes one per byte).
    "drivers/char/virtio_console",
    // A template instance's handover drive (see auraed's instance::template).
    "drivers/block/virtio_blk",
    "net/core/failover",
    "drivers/net/net_failover",
    "drivers/net/virtio_net",
    "fs/overlayfs/overlay",
    "net/llc/llc",
    "net/802/stp",
    "net/bridge/bridge",
    "drivers/net/veth",
];

/// Copies `list` (paths below the package's `kernel/`, without `.ko`) into `dir` with an
/// `order` file, as auraed's PID 1 and `--instance-modules` read them.
fn copy_modules(modroot: &Path, list: &[&str], dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut order = String::new();
    for m in list {
        let src = modroot.join(format!("{m}.ko"));
        let name = m.rsplit('/').next().unwrap_or(m);
        std::fs::copy(&src, dir.join(format!("{name}.ko")))
            .with_context(|| format!("module {}", src.display()))?;
        order.push_str(name);
        order.push('\n');
    }
    std::fs::write(dir.join("order"), order)?;
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes the uncompressed kernel (the ELF `vmlinux`) inside the bzImage `vmlinuz` to `out`,
/// for a microVM to boot without decompressing itself (the same kernel: the boot bench's
/// `vmlinux` arm). The payload is found through the setup header (boot protocol ≥ 2.08:
/// `setup_sects` at 0x1f1, `payload_offset`/`payload_length` at 0x248), is xz-compressed
/// (Debian's `CONFIG_KERNEL_XZ`) and ends with its uncompressed size (4 bytes,
/// little-endian), which the result must have.
fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> anyhow::Result<()> {
    let image = std::fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let field = |at: usize, len: usize| {
        image
            .get(at..at + len)
            .with_context(|| format!("{}: too short for a bzImage", vmlinuz.display()))
    };
    let u32_at = |at: usize| -> anyhow::Result<usize> {
        let b = field(at, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let version = field(0x206, 2).map(|b| u16::from_le_bytes([b[0], b[1]]))?;
    if field(0x202, 4)? != b"HdrS" || version < 0x208 {
        bail!(
            "{}: not a bzImage with boot protocol 2.08 or later (no payload fields)",
            vmlinuz.display()
        );
    }
    let setup_sects = match field(0x1f1, 1)?[0] {
        0 => 4,
        n => usize::from(n),
    };
    let (offset, length) = (u32_at(0x248)?, u32_at(0x24c)?);
    let start = (setup_sects + 1) * 512 + offset;
    let payload = field(start, length)?;
    let (compressed, size) = payload.split_at(length.saturating_sub(4));
    let size = u32::from_le_bytes(size.try_into().context("payload shorter than 4 bytes")?);
    if !compressed.starts_with(b"\xfd7zXZ\0") {
        bail!(
            "{}: its payload is not xz-compressed (magic {:02x?})",
            vmlinuz.display(),
            &compressed[..compressed.len().min(6)]
        );
    }
    let mut xz = Command::new("xz")
        .args(["--decompress", "--stdout", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running xz (apt-get install xz-utils)")?;
    let mut stdin = xz.stdin.take().context("xz's stdin")?;
    let input = compressed.to_vec();
    let feeder = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &input));
    let result = xz.wait_with_output()?;
    let fed = feeder
        .join()
        .map_err(|_| anyhow::anyhow!("the thread feeding xz panicked"))?;
    if !result.status.success() {
        bail!(
            "xz failed on {}'s payload: {}",
            vmlinuz.display(),
            String::from_utf8_lossy(&result.stderr)
        );
    }
    fed.context("writing the payload to xz")?;
    let elf = result.stdout;
    if elf.len() != size as usize || !elf.starts_with(b"\x7fELF") {
        bail!(
            "{}: the payload decompressed to {} bytes{}, its header says {size}",
            vmlinuz.display(),
            elf.len(),
            if elf.starts_with(b"\x7fELF") {
                ""
            } else {
                " (not an ELF)"
            }
        );
    }
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, &elf)?;
    std::fs::rename(&tmp, out)?;
    eprintln!(
        "==> {} ({} MiB) from {}",
        out.display(),
        elf.len() >> 20,
        vmlinuz.display()
    );
    Ok(())
}

/// Prepares the guest tier's artifacts in target/guest: Debian's kernel (and its
/// uncompressed `vmlinux`, [`extract_vmlinux`]) and the modules the guest needs (downloaded and extracted, nothing installed), busybox-static, and a
/// static auraed. The kernel is cached; everything else is refreshed.
fn guest() -> anyhow::Result<ExitCode> {
    let out = root().join("target/guest");
    let pkg_dir = out.join("kernel-pkg");
    std::fs::create_dir_all(out.join("modules"))?;
    if !out.join("vmlinuz").exists() || !pkg_dir.exists() {
        let deps = output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
        let pkg = deps
            .lines()
            .find_map(|l| {
                l.trim().strip_prefix("Depends: ").filter(|p| {
                    p.starts_with("linux-image-")
                        && p.as_bytes().get(12).is_some_and(u8::is_ascii_digit)
                })
            })
            .context("apt-cache names no linux-image-<version> for linux-image-amd64")?
            .to_owned();
        let dl = out.join("download");
        std::fs::create_dir_all(&dl)?;
        run(
            &format!("apt-get download {pkg}"),
            Command::new("apt-get")
                .args(["download", &pkg])
                .current_dir(&dl),
        )?;
        let deb = std::fs::read_dir(&dl)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("downloaded .deb not found")?;
        let _ = std::fs::remove_dir_all(&pkg_dir);
        run(
            "dpkg -x",
            Command::new("dpkg").arg("-x").arg(&deb).arg(&pkg_dir),
        )?;
        let kernel = std::fs::read_dir(pkg_dir.join("boot"))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .context("no vmlinuz in the package")?;
        std::fs::copy(&kernel, out.join("vmlinuz"))?;
        std::fs::write(out.join("versions.txt"), format!("guest kernel: {pkg}\n"))?;
        let _ = std::fs::remove_dir_all(&dl);
    }
    let (vmlinuz, vmlinux) = (out.join("vmlinuz"), out.join("vmlinux"));
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&vmlinux) < modified(&vmlinuz) {
        extract_vmlinux(&vmlinuz, &vmlinux)?;
    }
    let modroot = std::fs::read_dir(pkg_dir.join("lib/modules"))?
        .flatten()
        .map(|e| e.path().join("kernel"))
        .next()
        .context("no lib/modules/<version> in the kernel package")?;
    copy_modules(&modroot, GUEST_MODULES, &out.join("modules"))?;
    copy_modules(&modroot, INSTANCE_MODULES, &out.join("instance-modules"))?;
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        bail!("/bin/busybox is missing: apt-get install busybox-static");
    }
    std::fs::copy(busybox, out.join("busybox"))?;
    run(
        "static auraed (crt-static, release)",
        cargo()
            .args([
                "build",
                "--release",
                "--locked",
                "-p",
                "auraed",
                "--target",
                "x86_64-unknown-linux-gnu",
            ])
            .env("RUSTFLAGS", "-C target-feature=+crt-static"),
    )?;
    std::fs::copy(
        root().join("target/x86_64-unknown-linux-gnu/release/auraed"),
        out.join("auraed"),
    )?;
    eprintln!("==> guest artifacts ready in {}", out.display());
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let task = env::args().nth(1).unwrap_or_default();
    let result = match task.as_str() {
        "test" => test(),
        "lint" => lint().map(|()| ExitCode::SUCCESS),
        "deps" => check_deps().map(|()| ExitCode::SUCCESS),
        "demo" => demo(),
        "guest" => guest(),
        "readme" => readme().map(|t| {
            if t.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }),
        "setup" => setup().map(|problems| {
            if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }),
        "fuzz" => fuzz_smoke(
            std::env::args()
                .nth(2)
                .and_then(|s| s.parse().ok())
                .unwrap_or(60),
        )
        .map(|ok| {
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }),
        _ => {
            eprintln!("usage: cargo xtask <test|setup|lint|deps|demo|guest|readme|fuzz [SECS]>");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every `.rs` file below `dir`.
fn rust_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bzImage-shaped file: `setup_sects` 1, boot protocol 2.15, `payload` at
    /// `payload_offset` 16 in the protected-mode part.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 1024 + 16];
        img[0x1f1] = 1;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x20f_u16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&16_u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(payload);
        img
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let dir = tempdir();
        let p = dir.join("in");
        std::fs::write(&p, data).unwrap();
        assert!(
            Command::new("xz")
                .arg("-k")
                .arg(&p)
                .status()
                .unwrap()
                .success()
        );
        std::fs::read(dir.join("in.xz")).unwrap()
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "xtask-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_uncompressed_kernel_is_taken_out_of_a_bzimage_and_checked() {
        if Command::new("xz").arg("--version").output().is_err() {
            println!("SKIP: no xz (apt-get install xz-utils)");
            return;
        }
        let dir = tempdir();
        let (vmlinuz, out) = (dir.join("vmlinuz"), dir.join("vmlinux"));
        let elf = [b"\x7fELF".as_slice(), &[7u8; 5000]].concat();
        let mut payload = xz(&elf);
        payload.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        std::fs::write(&vmlinuz, bzimage(&payload)).unwrap();
        extract_vmlinux(&vmlinuz, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), elf);

        // A size that does not match, a payload that is not xz, not a bzImage: errors
        // naming why, and nothing written.
        std::fs::remove_file(&out).unwrap();
        let n = payload.len();
        payload[n - 4..].copy_from_slice(&1_u32.to_le_bytes());
        std::fs::write(&vmlinuz, bzimage(&payload)).unwrap();
        let e = extract_vmlinux(&vmlinuz, &out).unwrap_err().to_string();
        assert!(e.contains("header says 1"), "{e}");
        std::fs::write(&vmlinuz, bzimage(b"\x1f\x8bgzip....")).unwrap();
        let e = extract_vmlinux(&vmlinuz, &out).unwrap_err().to_string();
        assert!(e.contains("not xz-compressed"), "{e}");
        std::fs::write(&vmlinuz, vec![0u8; 4096]).unwrap();
        let e = extract_vmlinux(&vmlinuz, &out).unwrap_err().to_string();
        assert!(e.contains("not a bzImage"), "{e}");
        assert!(!out.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn panics_are_kept_with_their_binary_and_message_without_frames() {
        let err: &[u8] = b"     Running tests/a.rs (target/debug/deps/a-1)\n\
thread 'tokio-rt-worker' (7) panicked at crates/x/tests/a.rs:81:17:\n\
RunPod web: no answer\n\
stack backtrace:\n   0: std::panicking\n             at /rustc/x.rs:1\n\
     Running tests/b.rs (target/debug/deps/b-2)\n\
thread 'main' panicked at b.rs:1:1:\nboom\n";
        let p = panics_of(err);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].starts_with("in tests/a.rs (target/debug/deps/a-1):\n"),
            "{p:?}"
        );
        assert!(p[0].contains("RunPod web: no answer"), "{p:?}");
        assert!(!p[0].contains("std::panicking"), "{p:?}");
        assert!(
            p[1].contains("tests/b.rs") && p[1].ends_with("boom\n"),
            "{p:?}"
        );
        assert_eq!(
            (
                is_frame("   0: std::panicking"),
                is_frame("  at /rustc/x.rs:1")
            ),
            (true, true)
        );
        assert!(!is_frame("thread 'main' panicked at b.rs:1:1:"));
    }

    #[test]
    fn the_walkthrough_output_may_hold_bytes_that_are_not_utf8() {
        let out: &[u8] =
            b"README.md:1 ok\n\xff\xfe binary from a workload\nREADME.md:7 ok\nREADME.md:9 ok";
        assert_eq!(echo_and_count_ok(out), 3);
    }

    #[test]
    fn the_cgroup_root_is_where_auraed_puts_it() {
        let hybrid =
            "tmpfs /sys/fs/cgroup tmpfs ro 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        // Pure v2: a cgroup named `unified` (a directory, not a mount) is not the root.
        let pure = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn readme_blocks_are_found_with_their_reasons() {
        let md = "text\n```sh\necho a\n```\n<!-- not run: boots QEMU -->\n```sh\nqemu\n```\n```toml\nx = 1\n```\n";
        let b = sh_blocks(md);
        assert_eq!(b.len(), 2, "{b:?}");
        assert_eq!(
            (b[0].line, b[0].text.as_str(), b[0].not_run.as_deref()),
            (2, "echo a\n", None)
        );
        assert_eq!(b[1].not_run.as_deref(), Some("boots QEMU"));
        assert_eq!(b[1].text, "qemu\n");
    }

    #[test]
    fn crate_imports_reads_paths_and_groups() {
        let src = "use crate::{\n    events::EventBus,\n    workload::{WorkloadError, cgroup::{A, B}},\n    spec,\n};\nuse crate::vm::Vms;\nfn f() { crate::cell::x(); let _ = crate::{self}; }\n";
        let got: Vec<String> = crate_imports(src).into_iter().collect();
        assert_eq!(got, ["cell", "events", "spec", "vm", "workload"]);
    }

    #[test]
    fn an_import_up_a_layer_is_a_problem() {
        let dir = tempdir_for_test();
        std::fs::create_dir_all(dir.join("cell")).unwrap();
        std::fs::write(
            dir.join("cell/run.rs"),
            "use crate::{vm::Vms, workload::X};",
        )
        .unwrap();
        std::fs::write(dir.join("vm.rs"), "use crate::cell::Cells;").unwrap();
        let p = module_order_problems(&dir);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("module cell imports crate::vm"), "{p:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempdir_for_test() -> PathBuf {
        let d = std::env::temp_dir().join(format!("xtask-layers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
