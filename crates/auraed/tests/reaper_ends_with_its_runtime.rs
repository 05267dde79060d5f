//! The reaper's task ends with its runtime — also when the runtime shuts down while a
//! reap waits for a spawn in flight (the spawn holds the reaper's gate until its child is
//! tracked). Nothing of the task may run on after its runtime: a task that did (it waited
//! in `block_in_place`, which takes it out of the runtime) panicked at its next timer
//! ("A Tokio 1.x context was found, but it is being shutdown") — at the end of a test, and
//! at the end of auraed. Runs anywhere (no root: the child is the test's own).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use aurae_sys::SpawnError;
use auraed::reaper::Reaper;

/// Every panic of this process, whatever thread it was on.
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

#[test]
fn the_reaper_ends_with_its_runtime_while_a_spawn_is_in_flight() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(mut p) = PANICS.lock() {
            p.push(info.to_string());
        }
        previous(info);
    }));
    let before = std::fs::read_to_string("/proc/self/status").unwrap();
    for round in 0..3 {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let reaper = Arc::new(Reaper::default());
        rt.spawn(reaper.clone().run());
        // Its SIGCHLD handler installed.
        std::thread::sleep(Duration::from_millis(100));
        // A spawn in flight: it holds the gate until released.
        let (holding, held) = mpsc::channel::<()>();
        let (release, released) = mpsc::channel::<()>();
        let r = reaper.clone();
        let spawn = std::thread::spawn(move || {
            r.spawn(|| {
                holding.send(()).unwrap();
                let _ = released.recv();
                Err(SpawnError::Setup(std::io::Error::other("no child (test)")))
            })
        });
        held.recv().unwrap();
        // A child exits: the reaper wakes and has to wait for the gate.
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        drop(child);
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok(),
            "round {round}: the child was reaped although a spawn held the gate"
        );
        // The runtime shuts down while the reap waits; then the spawn ends.
        let dropper = std::thread::spawn(move || drop(rt));
        std::thread::sleep(Duration::from_millis(200));
        release.send(()).unwrap();
        assert!(spawn.join().unwrap().is_err());
        dropper.join().unwrap();
        // Whatever of the task was still running has met its timer by now.
        std::thread::sleep(Duration::from_millis(300));
        // The reap that waited still happened: the child is gone, not left a zombie.
        assert!(
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_err(),
            "round {round}: the child {pid} was not reaped"
        );
    }
    let panics = PANICS.lock().unwrap().clone();
    assert!(
        panics.is_empty(),
        "panics after the runtime ended: {panics:?}"
    );
    // No thread of the runtimes is left running.
    let threads = |s: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .map(|n| n.trim().parse::<u32>().unwrap())
            .unwrap()
    };
    let after = std::fs::read_to_string("/proc/self/status").unwrap();
    assert!(
        threads(&after) <= threads(&before),
        "threads {} before, {} after",
        threads(&before),
        threads(&after)
    );
}
