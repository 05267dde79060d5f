//! Image pull benchmark: pull + verify + unpack of a test image from a loopback registry
//! into a fresh store, vs `skopeo copy` (to an OCI layout) + `umoci unpack` of the same
//! image (target ≤ 1×). Rounds are interleaved so load drifts hit both alike; every round
//! starts from an empty store / directory (nothing cached).
//!
//! The image: a busybox-static root plus a layer of 400 files (about 24 MiB, half of it
//! compressible) so that extraction, not HTTP set-up, dominates. Needs docker-registry,
//! busybox-static, skopeo and umoci (prints SKIP otherwise).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code

use std::{
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use aurae_testkit::{oci, registry::LocalRegistry};
use auraed::image::{
    pull::Puller,
    reference::ImageRef,
    registry::{Registry, RegistryConfig},
    store::ImageStore,
    unpack::Limits,
};

fn median_ms(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.1), at(0.9))
}

fn data_layer() -> Vec<u8> {
    let mut l = oci::LayerBuilder::new().dir("data", 0o755).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..400 {
        let mut buf = vec![0u8; 64 * 1024];
        // Half random (incompressible), half text (compressible).
        for (j, b) in buf.iter_mut().enumerate() {
            if j % 2 == 0 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            } else {
                *b = b'a' + (j % 26) as u8;
            }
        }
        l = l.file(&format!("data/f{i:04}"), &buf, 0o644).unwrap();
    }
    l.finish().unwrap()
}

fn main() {
    let missing = aurae_testkit::registry::needs_registry()
        .or_else(oci::needs_busybox)
        .or_else(|| {
            ["skopeo", "umoci"]
                .into_iter()
                .find(|t| {
                    !Command::new(t)
                        .arg("--version")
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success())
                })
                .map(|t| format!("{t} is not installed (apt-get install skopeo umoci)"))
        });
    if let Some(reason) = missing {
        println!("SKIP images bench: {reason}");
        return;
    }
    let rounds = aurae_testkit::bench_rounds(10);
    let reg = LocalRegistry::start().unwrap();
    let host = reg.host();
    let layers = [
        oci::busybox_rootfs().unwrap().finish().unwrap(),
        data_layer(),
    ];
    let bytes: usize = layers.iter().map(|l| oci::gzip(l).len()).sum();
    oci::push_image(
        &host,
        "bench/pull",
        "v1",
        &layers,
        serde_json::json!({"Cmd": ["sh"]}),
    )
    .unwrap();
    println!(
        "images bench: {rounds} interleaved rounds, image of 2 layers, {:.1} MiB compressed, {:.1} MiB uncompressed",
        bytes as f64 / f64::from(1 << 20),
        layers.iter().map(Vec::len).sum::<usize>() as f64 / f64::from(1 << 20)
    );
    let rt = aurae_testkit::bench_runtime().unwrap();
    let r = ImageRef::parse(&format!("{host}/bench/pull:v1")).unwrap();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..=rounds {
        let dir = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let puller = Puller {
            store: Arc::new(ImageStore::open(&dir.path().join("state")).unwrap()),
            registry: Registry::new(RegistryConfig {
                insecure: vec![host.clone()],
                timeout: Duration::from_secs(10),
                ..Default::default()
            }),
            limits: Limits::default(),
            timeout: Duration::from_secs(10),
        };
        rt.block_on(puller.pull(&r, |_| {})).unwrap();
        let a = t.elapsed();
        let t = Instant::now();
        let layout = dir.path().join("layout");
        let ok = Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{host}/bench/pull:v1"))
            .arg(format!("oci:{}:v1", layout.display()))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            && Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(format!("{}:v1", layout.display()))
                .arg(dir.path().join("bundle"))
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        let b = t.elapsed();
        assert!(ok, "skopeo copy + umoci unpack failed");
        assert!(Path::new(&dir.path().join("bundle/rootfs/bin/busybox")).exists());
        if i > 0 {
            ours.push(a);
            theirs.push(b);
        }
    }
    let (m, p10, p90) = median_ms(ours);
    println!("  aurae pull+verify+unpack         median {m:9.1} ms  p10 {p10:9.1}  p90 {p90:9.1}");
    let (m2, q10, q90) = median_ms(theirs);
    println!("  skopeo copy + umoci unpack       median {m2:9.1} ms  p10 {q10:9.1}  p90 {q90:9.1}");
    println!("  ratio aurae/(skopeo+umoci) = {:.2} (target <= 1)", m / m2);
    drop(reg);
}
