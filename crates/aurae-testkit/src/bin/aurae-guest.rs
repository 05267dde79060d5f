//! Boots the guest tier's image by hand and keeps it running until Ctrl-C:
//! `cargo xtask guest && cargo run -p aurae-testkit --bin aurae-guest`.
//! Prints how to talk to the guest's auraed with `aer` (from inside the private network
//! namespace the guest's TAP device lives in).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use aurae_testkit::guest::{Guest, GuestOptions, needs_guest};

fn main() -> ExitCode {
    if let Some(reason) = needs_guest() {
        eprintln!("aurae-guest: cannot boot: {reason}");
        return ExitCode::FAILURE;
    }
    let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    else {
        eprintln!("aurae-guest: cannot start the async runtime");
        return ExitCode::FAILURE;
    };
    rt.block_on(async {
        let g = match Guest::boot(GuestOptions::default()).await {
            Ok(g) => g,
            Err(e) => {
                eprintln!("aurae-guest: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        println!(
            "guest auraed (PID 1) answered health {:.2} s after qemu started",
            g.boot_time.as_secs_f64()
        );
        println!("serial console: {}", g.serial.display());
        println!("talk to it:");
        println!(
            "  ip netns exec {} target/debug/aer --pki-dir {} --endpoint {} info",
            g.netns,
            g.pki.dir.display(),
            g.addr
        );
        println!("Ctrl-C (or SIGTERM) stops the guest and removes the namespace.");
        // Ctrl-C or SIGTERM: return, so the guest's Drop stops QEMU and deletes the namespace.
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        ExitCode::SUCCESS
    })
}
