//! Spawn from an instance template vs a cold Spawn, inside one guest-tier machine L1 (QEMU
//! TCG `-cpu max`, nested KVM). One warm-up Spawn with TEMPLATE_REQUIRED builds the
//! template (its time printed); then rounds, the order alternating, one nested guest at a
//! time (each instance stopped and freed before the next):
//!
//! - A: `Runtime/Spawn` (1 vCPU, 512 MiB) with TEMPLATE_AUTO: restored from the stored
//!   template, made unique, ready = the RPC returning (the child answers health over mTLS
//!   with its own SVID). Also the restore alone (the VMM's report, in `boot_reason`).
//! - B: the same Spawn with TEMPLATE_NEVER: the instance kernel booted.
//!
//! Prints `report` lines (median / p10 / p90) and `RATIO` lines (target A/B ≤ 0.05). A
//! round whose Spawn fails while L1 no longer answers ends the rounds (what was measured
//! is reported).
//! Needs the guest tier (root, qemu, `cargo xtask guest`); prints SKIP otherwise.
//! `AURAE_BENCH_ROUNDS` (default 3).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code

use std::time::{Duration, Instant};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::guest::{Guest, GuestOptions, instance_files, needs_guest};

fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

/// One Spawn; its status and how long the RPC took, or why it failed (bounded: the
/// child's own ready_timeout is 240 s).
async fn spawn(
    c: &Client,
    name: &str,
    template: pb::TemplateUse,
) -> Result<(pb::InstanceStatus, Duration), String> {
    let t = Instant::now();
    let mut rt = c.runtime();
    let call = rt.spawn(pb::Instance {
        name: name.into(),
        isolation: pb::Isolation::VirtualMachine as i32,
        vcpus: 1,
        memory_bytes: 512 << 20,
        ready_timeout: secs(240),
        template: template as i32,
        ..Default::default()
    });
    match tokio::time::timeout(Duration::from_secs(270), call).await {
        Ok(Ok(r)) => Ok((r.into_inner(), t.elapsed())),
        Ok(Err(e)) => Err(format!("{e:?}")),
        Err(_) => Err("no answer within 270 s".into()),
    }
}

/// Whether L1's auraed still answers (a frozen L1 ends the rounds).
async fn l1_alive(c: &Client) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(15), c.daemon().info(pb::InfoRequest {})).await,
        Ok(Ok(_))
    )
}

async fn stop_and_free(c: &Client, name: &str) {
    let _ = c
        .instances()
        .stop(pb::StopRequest {
            name: name.into(),
            grace_period: secs(5),
        })
        .await;
    if let Err(e) = c.instances().free(pb::NameRef { name: name.into() }).await {
        println!("  freeing {name}: {e:?}");
    }
}

/// The restore alone, from "restored from template … (restore 27.5 ms)".
fn restore_ms(reason: &str) -> Option<f64> {
    reason
        .split("(restore ")
        .nth(1)?
        .split(" ms")
        .next()?
        .parse()
        .ok()
}

fn stats(v: &[f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    Some((at(0.5), at(0.1), at(0.9)))
}

fn report(name: &str, unit: &str, v: &[f64], fails: usize) -> f64 {
    match stats(v) {
        None => {
            println!("report {name:<44} no samples  fails {fails}");
            f64::NAN
        }
        Some((m, p10, p90)) => {
            println!(
                "report {name:<44} median {m:8.3} {unit}  p10 {p10:8.3}  p90 {p90:8.3}  n {}  fails {fails}",
                v.len()
            );
            m
        }
    }
}

fn main() {
    if let Some(reason) = needs_guest() {
        println!("SKIP spawn template bench: {reason}");
        return;
    }
    let rounds = aurae_testkit::bench_rounds(3);
    let rt = aurae_testkit::bench_runtime().unwrap();
    rt.block_on(async {
        let g = Guest::boot(GuestOptions {
            extra_files: instance_files().unwrap(),
            memory_mib: 2048,
            timeout: Duration::from_secs(300),
            ..Default::default()
        })
        .await
        .unwrap();
        let c = g.client("admin").await.unwrap();
        // Warm-up: builds the template (and waits for L1's KVM probe).
        let mut built = None;
        for attempt in 1..=3 {
            match spawn(&c, "warm", pb::TemplateUse::TemplateRequired).await {
                Ok((s, took)) => {
                    println!(
                        "warm-up: template {} built and restored, ready in {:.1} s",
                        s.template,
                        took.as_secs_f64()
                    );
                    built = Some(s);
                    break;
                }
                Err(e) => println!("  warm-up try {attempt}: {e}"),
            }
        }
        stop_and_free(&c, "warm").await;
        if built.is_none() {
            println!("SKIP spawn template bench: no template could be built (nested guest faults)");
            return;
        }
        let (mut a, mut restore, mut b) = (Vec::new(), Vec::new(), Vec::new());
        let (mut a_fails, mut b_fails) = (0, 0);
        'rounds: for i in 0..rounds {
            let order = if i % 2 == 0 { ["a", "b"] } else { ["b", "a"] };
            for side in order {
                let name = format!("{side}{i}");
                let use_ = if side == "a" {
                    pb::TemplateUse::TemplateAuto
                } else {
                    pb::TemplateUse::TemplateNever
                };
                match spawn(&c, &name, use_).await {
                    Ok((s, took)) => {
                        println!(
                            "  round {i} {side}: ready in {:.2} s ({})",
                            took.as_secs_f64(),
                            s.boot_reason
                        );
                        if side == "a" {
                            if s.template.is_empty() {
                                a_fails += 1;
                            } else {
                                a.push(took.as_secs_f64());
                                restore.extend(restore_ms(&s.boot_reason));
                            }
                        } else {
                            b.push(took.as_secs_f64());
                        }
                    }
                    Err(e) => {
                        println!("  round {i} {side}: {e}");
                        if side == "a" {
                            a_fails += 1;
                        } else {
                            b_fails += 1;
                        }
                        if !l1_alive(&c).await {
                            println!(
                                "  L1 stopped answering (a TCG machine under nested KVM can freeze): \
                                 the rounds end here; L1's console: {}",
                                g.serial.display()
                            );
                            break 'rounds;
                        }
                    }
                }
                stop_and_free(&c, &name).await;
            }
        }
        let ma = report("A spawn from template -> ready", "s", &a, a_fails);
        let mb = report("B cold spawn -> ready", "s", &b, b_fails);
        let mr = report("A restore alone (VMM)", "ms", &restore, 0);
        println!(
            "RATIO spawn from template / cold spawn = {:.3} (target <= 0.05)",
            ma / mb
        );
        println!("RATIO restore alone = {mr:.1} ms (target <= 10 ms on this nested setup)");
        drop(g);
    });
}
