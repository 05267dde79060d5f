//! `guest::with_live_guest`: a guest machine that stops answering (its QEMU frozen with
//! SIGSTOP, as a wedged emulator looks from outside) is dropped with the test body and the
//! body runs once more on a fresh machine; a body that panics fails at once, on one machine.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use aurae_testkit::{
    guest::{GuestOptions, needs_guest, with_live_guest},
    tier::{self, Tier},
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_guest_machine_is_replaced_once_and_a_panic_is_not_retried() {
    if !tier::check(
        "a_frozen_guest_machine_is_replaced_once_and_a_panic_is_not_retried",
        Tier::Guest,
        needs_guest(),
    ) {
        return;
    }
    let runs = Arc::new(AtomicUsize::new(0));
    let frozen = Arc::new(std::sync::Mutex::new(None));
    let t = Instant::now();
    let (r, f) = (runs.clone(), frozen.clone());
    with_live_guest("wedge", GuestOptions::default(), move |g| {
        let (r, f) = (r.clone(), f.clone());
        async move {
            if r.fetch_add(1, Ordering::SeqCst) == 0 {
                let pid = g.qemu_pid().unwrap();
                *f.lock().unwrap() = Some(pid);
                kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
                tokio::time::sleep(Duration::from_secs(900)).await;
                panic!("the frozen machine was not replaced");
            }
            let c = g.client("admin").await.unwrap();
            let h = c
                .health()
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .unwrap();
            assert_eq!(h.get_ref().status, 1);
        }
    })
    .await
    .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    println!(
        "frozen machine replaced; both runs took {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // The frozen QEMU was killed with its machine, not left stopped.
    let pid = frozen.lock().unwrap().unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z ")),
        "QEMU {pid} is still there"
    );

    // A panic is the test's failure: passed on, never retried.
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let outcome = tokio::spawn(with_live_guest(
        "panics",
        GuestOptions::default(),
        move |_g| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                panic!("the body's own failure");
            }
        },
    ))
    .await;
    let e = outcome.expect_err("the panic is passed on");
    assert!(e.is_panic());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
