//! Image pulls against a real registry (Debian's docker-registry on 127.0.0.1) with images
//! these tests build and push themselves: pull, re-pull without refetch, pull by digest,
//! concurrent pulls sharing the work, a multi-layer image with whiteouts, and bad
//! registries: unknown image, size and diff-id mismatches, another platform, garbage and
//! stalls. After every failure the store holds nothing partial.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{io::Write, sync::Arc, time::Duration};

use aurae_testkit::{
    registry::{LocalRegistry, needs_registry},
    tier::{self, Tier},
};
use auraed::image::{
    pull::{PullError, Puller},
    reference::ImageRef,
    registry::{Registry, RegistryConfig},
    store::{ImageStore, StoreError, sha256},
    unpack::Limits,
};
use bytes::Bytes;
use http::{Method, header};

fn tar_layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_path(path).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

struct Pushed {
    manifest_digest: String,
    layer_bytes: u64,
}

async fn push_blob(reg: &Registry, host: &str, repo: &str, data: &[u8]) -> String {
    let d = sha256(data);
    // Start an upload session, then finish it in one PUT with the digest.
    let r = reg
        .send(
            Method::POST,
            &format!("http://{host}/v2/{repo}/blobs/uploads/"),
            &[],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), 202, "start upload");
    let loc = r
        .headers
        .get(header::LOCATION)
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let loc = if loc.starts_with("http") {
        loc
    } else {
        format!("http://{host}{loc}")
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = reg
        .send(
            Method::PUT,
            &format!("{loc}{sep}digest={d}"),
            &[(header::CONTENT_TYPE, "application/octet-stream".into())],
            Bytes::copy_from_slice(data),
        )
        .await
        .unwrap();
    assert!(r.status.is_success(), "upload {d}: {}", r.status);
    d
}

/// Pushes an image whose layers are `layers` (uncompressed tars, gzipped on the way).
/// `lie` optionally corrupts the manifest or config to build bad images.
async fn push(
    reg: &Registry,
    host: &str,
    repo: &str,
    tag: &str,
    layers: &[Vec<u8>],
    os_arch: (&str, &str),
    lie: Option<&str>,
) -> Pushed {
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut total = 0;
    for l in layers {
        let gz = gzip(l);
        let d = push_blob(reg, host, repo, &gz).await;
        let size = if lie == Some("size") {
            gz.len() + 7
        } else {
            gz.len()
        };
        total += gz.len() as u64;
        descs.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": size}));
        diff_ids.push(if lie == Some("diffid") {
            sha256(b"something else")
        } else {
            sha256(l)
        });
    }
    let config = serde_json::json!({
        "architecture": os_arch.1, "os": os_arch.0,
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let cbytes = serde_json::to_vec(&config).unwrap();
    let cd = push_blob(reg, host, repo, &cbytes).await;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cbytes.len()},
        "layers": descs,
    });
    let mbytes = serde_json::to_vec(&manifest).unwrap();
    let url = format!("http://{host}/v2/{repo}/manifests/{tag}");
    let r = reg
        .send(
            Method::PUT,
            &url,
            &[(
                header::CONTENT_TYPE,
                "application/vnd.oci.image.manifest.v1+json".into(),
            )],
            Bytes::from(mbytes.clone()),
        )
        .await
        .unwrap();
    if !r.status.is_success() {
        let status = r.status;
        let body =
            auraed::image::registry::read_small(r.body, 1 << 20, Duration::from_secs(2), host)
                .await
                .unwrap_or_default();
        panic!("manifest put: {status}: {}", String::from_utf8_lossy(&body));
    }
    Pushed {
        manifest_digest: sha256(&mbytes),
        layer_bytes: total,
    }
}

fn puller(state: &std::path::Path, insecure: &str) -> Puller {
    let cfg = RegistryConfig {
        insecure: vec![insecure.to_owned()],
        timeout: Duration::from_secs(2),
        ..Default::default()
    };
    Puller {
        store: Arc::new(ImageStore::open(state).unwrap()),
        registry: Registry::new(cfg),
        limits: Limits::default(),
        timeout: Duration::from_secs(2),
    }
}

fn ingest_is_empty(state: &std::path::Path) -> bool {
    std::fs::read_dir(state.join("images/ingest"))
        .unwrap()
        .count()
        == 0
        && std::fs::read_dir(state.join("images/layers/sha256"))
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().ends_with(".partial"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_repull_digest_concurrency_and_whiteouts() {
    if !tier::check(
        "pull_repull_digest_concurrency_and_whiteouts",
        Tier::Host,
        needs_registry().or_else(tier::needs_root),
    ) {
        return;
    }
    aurae_testkit::init_crypto();
    let r = LocalRegistry::start().unwrap();
    let host = r.host();
    let state = tempfile::tempdir().unwrap();
    let p = puller(state.path(), &host);
    let busybox = std::fs::read("/bin/busybox").unwrap_or_else(|_| b"not busybox".to_vec());
    let base = tar_layer(&[
        ("bin/busybox", &busybox),
        ("etc/hello", b"hello\n"),
        ("etc/keep", b"keep\n"),
    ]);
    let top = tar_layer(&[("etc/.wh.hello", b""), ("etc/new", b"new\n")]);
    let pushed = push(
        &p.registry,
        &host,
        "aurae/busybox",
        "latest",
        &[base, top],
        ("linux", "amd64"),
        None,
    )
    .await;

    let image = ImageRef::parse(&format!("{host}/aurae/busybox:latest")).unwrap();
    let first = p.pull(&image, |_| {}).await.unwrap();
    assert_eq!(first.manifest_digest, pushed.manifest_digest);
    assert_eq!(
        first.fetched_bytes, pushed.layer_bytes,
        "everything fetched once"
    );
    let (_, base_diff) = &first.layers[0];
    let (_, top_diff) = &first.layers[1];
    let base_dir = state
        .path()
        .join("images/layers/sha256")
        .join(base_diff.trim_start_matches("sha256:"));
    let top_dir = state
        .path()
        .join("images/layers/sha256")
        .join(top_diff.trim_start_matches("sha256:"));
    assert_eq!(
        std::fs::read(base_dir.join("bin/busybox")).unwrap(),
        busybox
    );
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::symlink_metadata(top_dir.join("etc/hello"))
            .unwrap()
            .file_type()
            .is_char_device(),
        "whiteout in overlay form"
    );
    assert_eq!(std::fs::read(top_dir.join("etc/new")).unwrap(), b"new\n");

    // Re-pull: nothing fetched again.
    let again = p.pull(&image, |_| {}).await.unwrap();
    assert_eq!(again.fetched_bytes, 0, "cached blobs are not fetched again");
    // By digest.
    let pinned =
        ImageRef::parse(&format!("{host}/aurae/busybox@{}", pushed.manifest_digest)).unwrap();
    assert_eq!(
        p.pull(&pinned, |_| {}).await.unwrap().manifest_digest,
        pushed.manifest_digest
    );

    // Concurrent pulls into a fresh store share the work: each blob fetched once.
    let state2 = tempfile::tempdir().unwrap();
    let p2 = puller(state2.path(), &host);
    let (a, b) = tokio::join!(p2.pull(&image, |_| {}), p2.pull(&image, |_| {}));
    let fetched = a.unwrap().fetched_bytes + b.unwrap().fetched_bytes;
    assert_eq!(
        fetched, pushed.layer_bytes,
        "two concurrent pulls fetched each blob once"
    );
    println!(
        "pulled {} layer bytes once; re-pull fetched 0; concurrent pulls fetched {fetched} in total",
        pushed.layer_bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_images_and_registries_fail_precisely_and_leave_nothing() {
    if !tier::check(
        "bad_images_and_registries_fail_precisely_and_leave_nothing",
        Tier::Host,
        needs_registry().or_else(tier::needs_root),
    ) {
        return;
    }
    aurae_testkit::init_crypto();
    let r = LocalRegistry::start().unwrap();
    let host = r.host();
    let state = tempfile::tempdir().unwrap();
    let p = puller(state.path(), &host);
    let layer = tar_layer(&[("a", b"a")]);

    let missing = ImageRef::parse(&format!("{host}/aurae/nothing:latest")).unwrap();
    assert!(matches!(
        p.pull(&missing, |_| {}).await,
        Err(PullError::NotFound { .. })
    ));

    push(
        &p.registry,
        &host,
        "aurae/size",
        "latest",
        std::slice::from_ref(&layer),
        ("linux", "amd64"),
        Some("size"),
    )
    .await;
    let e = p
        .pull(
            &ImageRef::parse(&format!("{host}/aurae/size:latest")).unwrap(),
            |_| {},
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, PullError::Store(StoreError::SizeMismatch { .. })),
        "{e}"
    );
    assert!(
        ingest_is_empty(state.path()),
        "nothing partial after a size mismatch"
    );

    push(
        &p.registry,
        &host,
        "aurae/diffid",
        "latest",
        std::slice::from_ref(&layer),
        ("linux", "amd64"),
        Some("diffid"),
    )
    .await;
    let e = p
        .pull(
            &ImageRef::parse(&format!("{host}/aurae/diffid:latest")).unwrap(),
            |_| {},
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, PullError::Store(StoreError::DigestMismatch { .. })),
        "{e}"
    );
    assert!(
        ingest_is_empty(state.path()),
        "the half-unpacked layer is removed"
    );

    push(
        &p.registry,
        &host,
        "aurae/arm",
        "latest",
        std::slice::from_ref(&layer),
        ("linux", "arm64"),
        None,
    )
    .await;
    let e = p
        .pull(
            &ImageRef::parse(&format!("{host}/aurae/arm:latest")).unwrap(),
            |_| {},
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not linux/amd64"), "{e}");

    // A wrong pinned digest.
    let wrong = ImageRef::parse(&format!("{host}/aurae/arm@sha256:{}", "0".repeat(64))).unwrap();
    assert!(p.pull(&wrong, |_| {}).await.is_err());

    // Plain HTTP only when the registry is marked insecure.
    let strict = Puller {
        registry: Registry::new(RegistryConfig {
            timeout: Duration::from_secs(2),
            ..Default::default()
        }),
        ..p.clone()
    };
    assert!(
        strict
            .pull(
                &ImageRef::parse(&format!("{host}/aurae/arm:latest")).unwrap(),
                |_| {}
            )
            .await
            .is_err()
    );

    // A "registry" that answers garbage, and one that stalls mid-answer.
    for (name, answer) in [
        (
            "garbage",
            &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!"[..],
        ),
        (
            "stall",
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{\"sche"[..],
        ),
    ] {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let answer = answer.to_vec();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(&answer).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        });
        let bad = puller(state.path(), &addr);
        let t = std::time::Instant::now();
        let e = bad
            .pull(&ImageRef::parse(&format!("{addr}/x/y:z")).unwrap(), |_| {})
            .await
            .unwrap_err();
        println!("{name}: {e} after {:?}", t.elapsed());
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{name} must fail by the deadline"
        );
        server.abort();
    }
    assert!(ingest_is_empty(state.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_api_pulls_with_progress_lists_and_removes() {
    if !tier::check(
        "images_api_pulls_with_progress_lists_and_removes",
        Tier::Host,
        needs_registry().or_else(tier::needs_root),
    ) {
        return;
    }
    aurae_testkit::init_crypto();
    let r = LocalRegistry::start().unwrap();
    let host = r.host();
    let pusher = Registry::new(RegistryConfig {
        insecure: vec![host.clone()],
        timeout: Duration::from_secs(2),
        ..Default::default()
    });
    let layer = tar_layer(&[("hello", b"world")]);
    let pushed = push(
        &pusher,
        &host,
        "aurae/api",
        "v1",
        &[layer],
        ("linux", "amd64"),
        None,
    )
    .await;
    let d = aurae_testkit::Daemon::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_auraed")),
        aurae_testkit::DaemonOptions {
            extra_args: vec!["--insecure-registry".into(), host.clone()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let c = d.client("admin").await.unwrap();
    use aurae_proto::runtime::v0 as pb;
    let image = format!("{host}/aurae/api:v1");
    let mut s = c
        .images()
        .pull(pb::PullImageRequest {
            image: image.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut phases = Vec::new();
    let mut last = None;
    while let Some(p) = s.message().await.unwrap() {
        phases.push(p.phase.clone());
        if p.image.is_some() {
            last = p.image;
        }
    }
    let info = last.expect("the final message describes the image");
    assert_eq!(info.digest, pushed.manifest_digest);
    assert_eq!(info.fetched_bytes, pushed.layer_bytes);
    assert!(
        phases.iter().any(|p| p == "downloading") && phases.iter().any(|p| p == "unpacking"),
        "{phases:?}"
    );
    let list = c
        .images()
        .list(pb::ListImagesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.images.len(), 1);
    assert_eq!(list.images[0].reference, image);
    // Bad input: a malformed reference, an unknown image.
    let e = c
        .images()
        .pull(pb::PullImageRequest {
            image: "UPPER/x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let mut s = c
        .images()
        .pull(pb::PullImageRequest {
            image: format!("{host}/aurae/none:v1"),
        })
        .await
        .unwrap()
        .into_inner();
    let e = loop {
        match s.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("pull of a missing image ended without an error"),
            Err(e) => break e,
        }
    };
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    // A second reference to the same image keeps its blobs and layer through the first
    // removal; the last removal collects them all.
    let mut s = c
        .images()
        .pull(pb::PullImageRequest {
            image: format!("{host}/aurae/api@{}", pushed.manifest_digest),
        })
        .await
        .unwrap()
        .into_inner();
    while s.message().await.unwrap().is_some() {}
    let images_dir = d.dir.path().join("state/images");
    let count = |sub: &str| std::fs::read_dir(images_dir.join(sub)).unwrap().count();
    let freed = c
        .images()
        .remove(pb::RemoveImageRequest {
            image: image.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (freed.freed_blobs, freed.freed_layers),
        (0, 0),
        "still referenced"
    );
    assert_eq!(count("layers/sha256"), 1);
    let freed = c
        .images()
        .remove(pb::RemoveImageRequest {
            image: format!("{host}/aurae/api@{}", pushed.manifest_digest),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(freed.freed_layers, 1);
    assert_eq!(freed.freed_blobs, 3, "manifest, config, layer");
    assert!(freed.freed_bytes >= pushed.layer_bytes);
    assert_eq!((count("blobs/sha256"), count("layers/sha256")), (0, 0));
    assert!(
        c.images()
            .list(pb::ListImagesRequest {})
            .await
            .unwrap()
            .into_inner()
            .images
            .is_empty()
    );
    let e = c
        .images()
        .remove(pb::RemoveImageRequest { image })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}
