//! `aer top` and the progress of long waits, with the real `aer` binary against a real
//! auraed (host tier: root and a cgroup v2 hierarchy; the pull tests also need Debian's
//! `docker-registry`): on a pseudo-terminal `aer top` redraws a nested tree in place on the
//! alternate screen, measures a busy executable's CPU, and leaves the screen as it found it
//! on Ctrl-C; on a pipe it prints one plain snapshot (or one JSON tree). `aer image pull`
//! draws bars on a terminal's stderr and keeps stdout for the result; on a pipe it writes
//! one line per layer event. `aer instance spawn` shows a spinner on a terminal only.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    io::Read,
    os::fd::OwnedFd,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    Daemon, DaemonOptions,
    cli::{Aer, auraed_beside},
    oci::{self, LayerBuilder},
    registry::{LocalRegistry, needs_registry},
    tier::{self, Tier},
};
use nix::{
    pty::{Winsize, openpty},
    sys::signal::{Signal, kill},
    unistd::Pid,
};

const AER: &str = env!("CARGO_BIN_EXE_aer");
const LIMIT: Duration = Duration::from_secs(60);
const ESC: char = '\x1b';

struct Env {
    d: Daemon,
    c: Client,
    aer: Aer,
}

async fn start(test: &str, opts: DaemonOptions, missing: Option<String>) -> Option<Env> {
    if !tier::check(test, Tier::Host, tier::needs_cells().or(missing)) {
        return None;
    }
    let auraed = auraed_beside(Path::new(AER)).unwrap();
    let d = Daemon::start(&auraed, opts).await.unwrap();
    let c = d.client("admin").await.unwrap();
    let aer = Aer::new(Path::new(AER), &d).unwrap();
    Some(Env { d, c, aer })
}

impl Env {
    async fn cell(&self, name: &str) {
        self.c
            .cells()
            .allocate(pb::Cell {
                name: name.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn exe(&self, cell: &str, name: &str, argv: &[&str]) {
        self.c
            .runtime()
            .run_executable(pb::Executable {
                cell: cell.into(),
                name: name.into(),
                argv: argv.iter().map(|s| (*s).to_owned()).collect(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// Cells `a` and `a/b`, an idle executable in `a` and a busy one in `a/b`.
    async fn nested(&self) {
        self.cell("a").await;
        self.cell("a/b").await;
        self.exe("a", "idle", &["/bin/sleep", "300"]).await;
        self.exe("a/b", "spin", &["/bin/sh", "-c", "while :; do :; done"])
            .await;
    }

    /// Frees what [`Env::nested`] made (the daemon's drop would kill it too; this checks
    /// the cells can go).
    async fn free_nested(&self) {
        for cell in ["a/b", "a"] {
            self.c
                .cells()
                .free(pb::NameRef { name: cell.into() })
                .await
                .unwrap();
        }
    }
}

/// A command running with a pseudo-terminal: as its stdin, stdout and stderr, or (with
/// `stdout_piped`) as stdin and stderr only, its stdout a pipe read apart.
struct OnPty {
    child: Child,
    /// Everything the terminal got so far.
    screen: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
    stdout: Option<JoinHandle<Vec<u8>>>,
}

impl OnPty {
    fn spawn(mut cmd: Command, cols: u16, rows: u16, stdout_piped: bool) -> Self {
        let ws = Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(Some(&ws), None).unwrap();
        let slave: OwnedFd = pty.slave;
        cmd.env("COLUMNS", cols.to_string())
            .env("LINES", rows.to_string())
            .env("TERM", "xterm-256color")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave.try_clone().unwrap()));
        if stdout_piped {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(Stdio::from(slave.try_clone().unwrap()));
        }
        let mut child = cmd.spawn().unwrap();
        drop(slave); // Only the child holds the terminal: reads end (EIO) when it exits.
        let screen = Arc::new(Mutex::new(Vec::new()));
        let into = screen.clone();
        let mut master = std::fs::File::from(pty.master);
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 {
                    break;
                }
                into.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let stdout = child.stdout.take().map(|mut s| {
            std::thread::spawn(move || {
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out);
                out
            })
        });
        Self {
            child,
            screen,
            reader: Some(reader),
            stdout,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().unwrap()).into_owned()
    }

    /// Waits until `done` holds for what the terminal shows, or `limit` passes.
    fn until(&self, limit: Duration, done: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let t = self.text();
            if done(&t) || start.elapsed() > limit {
                return t;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the exit (killing it past `limit`): its status, the terminal's bytes and
    /// the piped stdout.
    fn finish(mut self, limit: Duration) -> (std::process::ExitStatus, String, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > limit {
                self.child.kill().unwrap();
                let _ = self.child.wait();
                panic!(
                    "did not end within {limit:?}; the terminal shows:\n{}",
                    self.text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        let out = self
            .stdout
            .take()
            .map(|h| String::from_utf8_lossy(&h.join().unwrap()).into_owned())
            .unwrap_or_default();
        (status, self.text(), out)
    }
}

impl Drop for OnPty {
    fn drop(&mut self) {
        // Our own child, not reaped yet: its pid cannot have been reused.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Text with the escape sequences (CSI `ESC [ … letter`, and `ESC x`) taken out.
fn plain(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ESC {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

/// The CPU % column of the row of executable `name` in a frame of `aer top`.
fn cpu_of(frame: &str, name: &str) -> Option<f64> {
    frame.lines().find_map(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        let at = words.iter().position(|w| *w == name)?;
        if words.get(at + 1) != Some(&"executable") {
            return None;
        }
        words.get(at + 3)?.parse().ok()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn top_on_a_terminal_redraws_the_nested_tree_and_restores_the_screen() {
    let test = "top_on_a_terminal_redraws_the_nested_tree_and_restores_the_screen";
    let Some(e) = start(test, DaemonOptions::default(), None).await else {
        return;
    };
    e.nested().await;

    let top = OnPty::spawn(
        e.aer.command(&["top", "--interval", "300ms"]),
        120,
        40,
        false,
    );
    // Frames begin with "home"; wait for a few, and for the busy loop to show.
    let text = top.until(Duration::from_secs(20), |t| {
        t.matches("\x1b[H").count() >= 4
            && t.split("\x1b[H")
                .skip(2)
                .any(|f| cpu_of(&plain(f), "spin").is_some_and(|c| c > 0.0))
    });
    kill(Pid::from_raw(top.child.id() as i32), Signal::SIGINT).unwrap();
    let (status, text_after, _) = top.finish(Duration::from_secs(20));
    assert!(
        status.success(),
        "Ctrl-C ends aer top with 0: {status}\n{text_after}"
    );

    // The alternate screen, entered first and left last, with the cursor back.
    assert!(text.starts_with("\x1b[?1049h"), "{text:?}");
    let tail = text_after.rsplit("\x1b[H").next().unwrap();
    assert!(
        tail.contains("\x1b[?25h\x1b[?1049l"),
        "the screen is restored: {tail:?}"
    );
    assert!(text_after.trim_end().ends_with("\x1b[?1049l"), "{tail:?}");

    // At least two frames, each drawn in place (home, erase), none wider than the screen.
    let frames: Vec<String> = text.split("\x1b[H").skip(1).map(plain).collect();
    assert!(frames.len() >= 2, "{} frames: {text:?}", frames.len());
    assert!(text.contains("\x1b[K") && text.contains("\x1b[J"));
    for f in &frames {
        for l in f.lines() {
            assert!(l.chars().count() <= 120, "wider than the terminal: {l:?}");
        }
    }

    // The tree: a, then b below it, the busy executable below b, the idle one below a —
    // in the last whole frame (`text` may end in the middle of one; every frame ends with
    // erase-below).
    let whole: Vec<String> = text
        .split("\x1b[H")
        .skip(1)
        .filter(|f| f.contains("\x1b[J"))
        .map(plain)
        .collect();
    let f = whole.last().expect("a whole frame");
    let lines: Vec<&str> = f.lines().collect();
    let row = |pred: &dyn Fn(&str) -> bool| lines.iter().position(|l| pred(l));
    let a = row(&|l| l.starts_with("a ") && l.contains(" cell ")).expect(f);
    let b = row(&|l| l.contains("─ b ") && l.contains(" cell ")).expect(f);
    let spin = row(&|l| l.contains("─ spin ") && l.contains(" executable ")).expect(f);
    let idle = row(&|l| l.contains("─ idle ") && l.contains(" executable ")).expect(f);
    assert!(a < idle && a < b && b < spin, "{f}");
    assert!(
        lines[spin].starts_with("   └─ spin") || lines[spin].starts_with("│  └─ spin"),
        "spin is b's child: {f}"
    );
    assert!(f.starts_with("auraed "), "header: {f}");
    assert!(
        f.contains("cells 2") && f.contains("executables 2 (2 running)"),
        "{f}"
    );

    // CPU: the busy loop shows > 0 in a frame after the first (which has no earlier reading).
    let busy: Vec<f64> = frames
        .iter()
        .skip(1)
        .filter_map(|f| cpu_of(f, "spin"))
        .collect();
    assert!(
        busy.iter().any(|c| *c > 0.0),
        "spin's CPU % over the frames: {busy:?}\n{f}"
    );
    assert!(
        frames
            .iter()
            .all(|f| cpu_of(f, "spin").is_none_or(|c| c >= 0.0))
    );

    e.free_nested().await;
    drop(e.d);
}

#[tokio::test(flavor = "multi_thread")]
async fn top_on_a_pipe_prints_one_plain_snapshot_and_json_nests_the_tree() {
    let test = "top_on_a_pipe_prints_one_plain_snapshot_and_json_nests_the_tree";
    let Some(e) = start(test, DaemonOptions::default(), None).await else {
        return;
    };
    e.nested().await;

    let t0 = Instant::now();
    let r = e.aer.run(&["top"], LIMIT).unwrap();
    assert_eq!(r.code(), Some(0), "{r}");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "one snapshot, then exit"
    );
    assert!(!r.stdout.contains(ESC) && !r.stderr.contains(ESC), "{r}");
    assert_eq!(r.stdout.matches("NAME").count(), 1, "one snapshot: {r}");
    assert!(
        r.stdout.contains("─ spin ") && r.stdout.contains("─ b "),
        "{r}"
    );
    // The snapshot measured CPU over a short sample: the busy loop has a figure.
    assert!(cpu_of(&r.stdout, "spin").is_some(), "{r}");

    let r = e.aer.run(&["top", "-o", "json"], LIMIT).unwrap();
    assert_eq!(r.code(), Some(0), "{r}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let tree = v["tree"].as_array().unwrap();
    let a = tree.iter().find(|n| n["name"] == "a").expect(&r.stdout);
    assert_eq!(a["kind"], "cell");
    let kids = a["children"].as_array().unwrap();
    let idle = kids
        .iter()
        .find(|n| n["name"] == "a/idle")
        .expect(&r.stdout);
    assert_eq!(
        (idle["kind"].as_str(), idle["state"].as_str()),
        (Some("executable"), Some("running"))
    );
    let b = kids.iter().find(|n| n["name"] == "a/b").expect(&r.stdout);
    let spin = &b["children"][0];
    assert_eq!(spin["name"], "a/b/spin");
    assert!(
        spin["cpu_percent"].as_f64().is_some_and(|c| c >= 0.0),
        "{spin}"
    );
    assert!(
        spin["memory_bytes"].as_u64().is_some_and(|m| m > 0),
        "an executable's RSS: {spin}"
    );
    assert_eq!(v["totals"]["cells"], 2);
    assert_eq!(v["totals"]["executables_running"], 2);
    assert!(
        v["daemon"]["server_id"]
            .as_str()
            .is_some_and(|s| s.starts_with("spiffe://"))
    );

    // --once or -n 1 on a terminal: the same plain table, no escape codes, exit 0.
    for once in [&["top", "--once"][..], &["top", "-n", "1"]] {
        let top = OnPty::spawn(e.aer.command(once), 100, 30, false);
        let (status, text, _) = top.finish(LIMIT);
        assert!(status.success(), "{once:?}: {text}");
        assert!(!text.contains(ESC), "{once:?}: {text:?}");
        assert!(text.contains("─ spin "), "{once:?}: {text}");
    }

    // --prefix: only what is named under it.
    let r = e
        .aer
        .run(&["top", "--prefix", "a/b", "-o", "json"], LIMIT)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let names: Vec<&str> = v["tree"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(names, ["a/b"], "{r}");

    e.free_nested().await;
}

/// A layer of `n` bytes that gzip cannot shrink (xorshift noise).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Pushes a three-layer image (two of several MiB of noise); its manifest digest.
fn push_layers(host: &str, repo: &str) -> String {
    let layers = [
        LayerBuilder::new()
            .file("big-1", &noise(6 << 20, 1), 0o644)
            .unwrap()
            .finish()
            .unwrap(),
        LayerBuilder::new()
            .file("small", b"hello", 0o644)
            .unwrap()
            .finish()
            .unwrap(),
        LayerBuilder::new()
            .file("big-2", &noise(3 << 20, 2), 0o644)
            .unwrap()
            .finish()
            .unwrap(),
    ];
    oci::push_image(
        host,
        repo,
        "v1",
        &layers,
        serde_json::json!({"Cmd": ["/big-1"]}),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn image_pull_draws_bars_on_a_terminal_and_lines_on_a_pipe() {
    let test = "image_pull_draws_bars_on_a_terminal_and_lines_on_a_pipe";
    if !tier::check(
        test,
        Tier::Host,
        tier::needs_cells().or_else(needs_registry),
    ) {
        return;
    }
    let reg = LocalRegistry::start().unwrap();
    let host = reg.host();
    let digest = push_layers(&host, "aurae/layers");
    let opts = DaemonOptions {
        extra_args: vec!["--insecure-registry".into(), host.clone()],
        ..Default::default()
    };
    let e = start(test, opts, None).await.unwrap();
    let image = format!("{host}/aurae/layers:v1");

    // A terminal on stderr, stdout a pipe: bars there, the result alone here.
    let pull = OnPty::spawn(e.aer.command(&["image", "pull", &image]), 120, 30, true);
    let (status, err, out) = pull.finish(LIMIT);
    assert!(status.success(), "{err}\n{out}");
    assert!(
        err.contains('\r') && err.contains("\x1b["),
        "bars redraw in place: {err:?}"
    );
    assert!(
        err.contains("\x1b[2K") || err.contains("\x1b[1A"),
        "cursor moves: {err:?}"
    );
    let shown = plain(&err);
    assert!(shown.contains("total"), "{shown}");
    assert!(shown.contains("MiB"), "byte totals: {shown}");
    assert!(
        shown.trim_end().ends_with(&digest),
        "ends with the digest: {shown:?}"
    );
    assert!(!out.contains(ESC), "stdout keeps the result only: {out:?}");
    assert!(out.contains(&digest), "{out}");

    // Forget it (its blobs with it), then pull into pipes: one line per layer event.
    let r = e.aer.run(&["image", "rm", &image], LIMIT).unwrap();
    assert_eq!(r.code(), Some(0), "{r}");
    let r = e.aer.run(&["image", "pull", &image], LIMIT).unwrap();
    assert_eq!(r.code(), Some(0), "{r}");
    assert!(!r.stderr.contains(ESC) && !r.stderr.contains('\r'), "{r}");
    assert!(!r.stdout.contains(ESC) && r.stdout.contains(&digest), "{r}");
    let lines: Vec<&str> = r.stderr.lines().collect();
    // Three layers, each at least "unpacking" and "done" (and downloading or cached).
    assert!(lines.len() >= 9, "{r}");
    for phase in ["unpacking", "done"] {
        assert_eq!(
            lines.iter().filter(|l| l.contains(phase)).count(),
            3,
            "{phase}: {r}"
        );
    }
    assert!(
        lines.iter().all(|l| l.split_whitespace().count() >= 4),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn instance_spawn_shows_a_spinner_on_a_terminal_only() {
    let test = "instance_spawn_shows_a_spinner_on_a_terminal_only";
    let opts = DaemonOptions {
        own_netns: true,
        ..Default::default()
    };
    let Some(e) = start(test, opts, None).await else {
        return;
    };
    let spawn = OnPty::spawn(
        e.aer
            .command(&["instance", "spawn", "t1", "--isolation", "cell"]),
        100,
        30,
        true,
    );
    let (status, err, out) = spawn.finish(Duration::from_secs(120));
    assert!(status.success(), "{err}\n{out}");
    let shown = plain(&err);
    assert!(shown.contains("spawning instance t1"), "{shown:?}");
    assert!(shown.contains("done after"), "{shown:?}");
    assert!(err.contains('\r'), "the spinner redraws in place: {err:?}");
    assert!(!out.contains(ESC) && out.contains("t1"), "{out:?}");

    // On a pipe: no spinner, stderr stays empty.
    let r = e
        .aer
        .run(
            &["instance", "spawn", "t2", "--isolation", "cell"],
            Duration::from_secs(120),
        )
        .unwrap();
    assert_eq!(r.code(), Some(0), "{r}");
    assert!(r.stderr.is_empty(), "{r}");

    // `aer --instance t1 top`: the tree of the spawned instance, through this daemon (aer
    // runs in the daemon's network namespace, where the instance's address is).
    let ns = e.d.netns.clone().unwrap();
    let out = Command::new("timeout")
        .arg("60")
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(AER)
        .arg("--pki-dir")
        .arg(&e.aer.pki_dir)
        .arg("--socket")
        .arg(&e.aer.socket)
        .args(["--instance", "t1", "top", "-o", "json"])
        .env_remove("AER_INSTANCE")
        .env_remove("AURAE_CONFIG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["daemon"]["depth"], 1, "{text}");
    assert!(
        v["daemon"]["server_id"]
            .as_str()
            .is_some_and(|s| s.ends_with("/t1")),
        "{text}"
    );

    // The parent's tree shows both instances.
    let r = e.aer.run(&["top", "-o", "json"], LIMIT).unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let instances: Vec<&str> = v["tree"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["kind"] == "instance")
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(instances, ["t1", "t2"], "{r}");

    for name in ["t1", "t2"] {
        let mut x = e.c.instances();
        x.stop(pb::StopRequest {
            name: name.into(),
            grace_period: None,
        })
        .await
        .unwrap();
        x.free(pb::NameRef { name: name.into() }).await.unwrap();
    }
}
