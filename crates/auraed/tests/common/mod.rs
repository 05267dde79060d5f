//! What more than one guest-tier test binary uses (each includes it as `mod common`).

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)] // test code

use std::{sync::Arc, time::Duration};

use aurae_testkit::{cpio, oci, registry::LocalRegistry};

/// An HTTP server image serving `page` on port 8080 (and busybox) pulled from a loopback
/// registry into a store the initramfs carries to L1's /var/lib/aurae: L1 runs them
/// without a registry.
pub async fn seeded_store(page: &str) -> (String, String, Vec<cpio::Entry>) {
    use auraed::image::{
        pull::Puller,
        reference::ImageRef,
        registry::{Registry, RegistryConfig},
        store::ImageStore,
        unpack::Limits,
    };
    let reg = LocalRegistry::start().unwrap();
    let host = reg.host();
    oci::push_http_server(&host, "aurae/web", 8080, page).unwrap();
    oci::push_busybox(
        &host,
        "aurae/busybox",
        serde_json::json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]}),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let puller = Puller {
        store: Arc::new(ImageStore::open(dir.path()).unwrap()),
        registry: Registry::new(RegistryConfig {
            insecure: vec![host.clone()],
            timeout: Duration::from_secs(5),
            ..Default::default()
        }),
        limits: Limits::default(),
        timeout: Duration::from_secs(5),
    };
    let web = format!("{host}/aurae/web:v1");
    let busybox = format!("{host}/aurae/busybox:v1");
    for i in [&web, &busybox] {
        puller
            .pull(&ImageRef::parse(i).unwrap(), |_| {})
            .await
            .unwrap();
    }
    let mut e = vec![cpio::Entry::Dir {
        path: "var/lib/aurae".into(),
        mode: 0o700,
    }];
    e.extend(cpio::tree(&dir.path().join("images"), "var/lib/aurae/images").unwrap());
    (web, busybox, e)
}
