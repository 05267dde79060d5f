//! The `aer` binary against a test daemon: integration tests of the `aer` crate pass
//! `env!("CARGO_BIN_EXE_aer")`, find auraed beside it, and run command lines that reach the
//! daemon through its socket and PKI, each bounded in time.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::Daemon;

/// The `auraed` binary cargo built beside `aer` (same target directory).
pub fn auraed_beside(aer: &Path) -> anyhow::Result<PathBuf> {
    let auraed = aer.with_file_name("auraed");
    if !auraed.exists() {
        bail!(
            "{} is missing: build it first (`cargo build -p auraed`, or run the tests with \
             `cargo test --workspace`)",
            auraed.display()
        );
    }
    Ok(auraed)
}

/// `aer` with a test daemon's `--pki-dir` and `--socket` (identity `admin`).
#[derive(Debug, Clone)]
pub struct Aer {
    pub bin: PathBuf,
    pub pki_dir: PathBuf,
    pub socket: PathBuf,
}

/// How one `aer` command line ended, and what it wrote.
#[derive(Debug)]
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// The exit code (`None` when a signal ended aer itself).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "aer ended {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// An `aer` still running, its output read on the side.
#[derive(Debug)]
pub struct Running {
    pub child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

fn reader(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

impl Running {
    /// Its pid (for a signal a test sends it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `limit` for it to exit; past that it is killed and this fails with what
    /// it wrote.
    pub fn finish(mut self, limit: Duration) -> anyhow::Result<Ran> {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break Some(s);
            }
            if start.elapsed() > limit {
                self.child.kill()?;
                self.child.wait()?;
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let take = |h: Option<JoinHandle<String>>| {
            h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
        };
        let (stdout, stderr) = (take(self.stdout.take()), take(self.stderr.take()));
        match status {
            Some(status) => Ok(Ran {
                status,
                stdout,
                stderr,
            }),
            None => bail!(
                "aer did not end within {limit:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
            ),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Our own child, not reaped yet: its pid cannot have been reused.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Aer {
    /// `aer` at `bin` (pass `env!("CARGO_BIN_EXE_aer")`) talking to `d` as `admin`.
    pub fn new(bin: &Path, d: &Daemon) -> anyhow::Result<Self> {
        d.identity("admin")?;
        Ok(Self {
            bin: bin.to_owned(),
            pki_dir: d.pki.dir.clone(),
            socket: d.socket.clone(),
        })
    }

    /// `aer --pki-dir … --socket … ARGS`, stdin from /dev/null.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--pki-dir")
            .arg(&self.pki_dir)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("AURAE_CONFIG")
            .env_remove("AER_INSTANCE")
            .stdin(Stdio::null());
        c
    }

    /// Starts `aer ARGS` with its stdout and stderr captured.
    pub fn spawn(&self, args: &[&str]) -> anyhow::Result<Running> {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let stdout = child.stdout.take().map(reader);
        let stderr = child.stderr.take().map(reader);
        Ok(Running {
            child,
            stdout,
            stderr,
        })
    }

    /// Runs `aer ARGS` to its end (at most `limit`).
    pub fn run(&self, args: &[&str], limit: Duration) -> anyhow::Result<Ran> {
        self.spawn(args)?.finish(limit)
    }
}
