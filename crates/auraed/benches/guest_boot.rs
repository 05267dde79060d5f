//! Guest boot: time from QEMU start to the guest auraed answering mTLS health, against the
//! same kernel with a busybox `/init` that only prints a marker, interleaved boot by boot
//! (median of 5 each). The ratio shows what auraed's own start costs. Needs the guest tier
//! (root, qemu, `cargo xtask guest`); prints SKIP otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code

use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    guest::{Guest, GuestOptions, needs_guest},
    workload,
};

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    if let Some(reason) = needs_guest() {
        println!("SKIP guest boot bench: {reason}");
        return;
    }
    let rt = aurae_testkit::bench_runtime().unwrap();
    rt.block_on(async {
        let n: usize = std::env::var("AURAE_BOOTS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
        let (mut aurae, mut busybox, mut rss) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..n {
            let g = Guest::boot(GuestOptions::default()).await.unwrap();
            aurae.push(g.boot_time.as_secs_f64());
            let c = g.client("admin").await.unwrap();
            c.cells()
                .allocate(pb::Cell {
                    name: "m".into(),
                    namespaces: Some(pb::CellNamespaces { share_host_pid: true, ..Default::default() }),
                    ..Default::default()
                })
                .await
                .unwrap();
            let (_, out) = workload::run_to_end(
                &c,
                pb::Executable {
                    cell: "m".into(),
                    name: "rss".into(),
                    argv: vec!["/bin/grep".into(), "VmRSS".into(), "/proc/1/status".into()],
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            let out = out.into_bytes();
            let kb: f64 = String::from_utf8_lossy(&out).split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            rss.push(kb / 1024.0);
            drop(g);
            let b = Guest::boot(GuestOptions { busybox_init: true, ..Default::default() }).await.unwrap();
            busybox.push(b.boot_time.as_secs_f64());
        }
        let (am, amin, amax) = median(aurae);
        let (bm, bmin, bmax) = median(busybox);
        let (rm, _, _) = median(rss);
        println!("guest boot (QEMU TCG -cpu max, {n} boots each, interleaved):");
        println!("  qemu start -> auraed answers mTLS health   median {am:.2} s (min {amin:.2}, max {amax:.2})");
        println!("  qemu start -> busybox /init marker          median {bm:.2} s (min {bmin:.2}, max {bmax:.2})");
        println!("  ratio auraed/busybox = {:.2}; auraed's own start costs {:.2} s", am / bm, am - bm);
        println!("  guest auraed RSS after boot: median {rm:.1} MiB");
    });
}
