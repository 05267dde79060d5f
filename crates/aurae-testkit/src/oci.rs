//! OCI images built and pushed by tests: layers written with tar's builder (gzipped), a
//! busybox-static root filesystem, and a tiny blocking HTTP/1.1 client that pushes blobs
//! and a manifest to the loopback registry of [`crate::registry`].

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = gz.write_all(data);
    gz.finish().unwrap_or_default()
}

/// Builds one layer (an uncompressed tar).
pub struct LayerBuilder {
    b: tar::Builder<Vec<u8>>,
}

impl std::fmt::Debug for LayerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LayerBuilder")
    }
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> Self {
        Self {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    }

    pub fn dir(mut self, path: &str, mode: u32) -> anyhow::Result<Self> {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.b.append_data(&mut h, path, std::io::empty())?;
        Ok(self)
    }

    pub fn file(mut self, path: &str, data: &[u8], mode: u32) -> anyhow::Result<Self> {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.b.append_data(&mut h, path, data)?;
        Ok(self)
    }

    pub fn symlink(mut self, path: &str, target: &str) -> anyhow::Result<Self> {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.b.append_link(&mut h, path, target)?;
        Ok(self)
    }

    pub fn finish(self) -> anyhow::Result<Vec<u8>> {
        Ok(self.b.into_inner()?)
    }
}

/// `Some(reason)` unless a static busybox is installed.
pub fn needs_busybox() -> Option<String> {
    (!Path::new("/bin/busybox").exists())
        .then(|| "busybox-static is not installed (apt-get install busybox-static)".into())
}

/// A root filesystem with a static busybox, its applets as symlinks in /bin, the usual
/// directories, and root plus an unprivileged user `app` (1000:1000).
pub fn busybox_rootfs() -> anyhow::Result<LayerBuilder> {
    let bb = std::fs::read("/bin/busybox").context("reading /bin/busybox")?;
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .context("busybox --list")?;
    let mut l = LayerBuilder::new()
        .dir("bin", 0o755)?
        .dir("etc", 0o755)?
        .dir("proc", 0o555)?
        .dir("sys", 0o555)?
        .dir("dev", 0o755)?
        .dir("tmp", 0o1777)?
        .dir("root", 0o700)?
        .file("bin/busybox", &bb, 0o755)?
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/tmp:/bin/sh\n",
            0o644,
        )?
        .file("etc/group", b"root:x:0:\napp:x:1000:\n", 0o644)?;
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet != "busybox" && !applet.contains('/') {
            l = l.symlink(&format!("bin/{applet}"), "busybox")?;
        }
    }
    Ok(l)
}

/// Pushes [`busybox_rootfs`] as one layer to `host` as `<repo>:v1` with image config
/// `config`; its manifest digest.
pub fn push_busybox(host: &str, repo: &str, config: serde_json::Value) -> anyhow::Result<String> {
    let layer = busybox_rootfs()?.finish()?;
    push_image(host, repo, "v1", &[layer], config)
}

/// Pushes an HTTP server image to `host` as `<repo>:v1`: busybox (one layer) and a page
/// (a second layer, `/www/index.html` = `page`), served by `httpd -f -vv -p <port>`
/// (each request logged on stderr). Its manifest digest.
pub fn push_http_server(host: &str, repo: &str, port: u16, page: &str) -> anyhow::Result<String> {
    push_http_server_as(host, repo, "v1", port, page)
}

/// [`push_http_server`] as `<repo>:<tag>`.
pub fn push_http_server_as(
    host: &str,
    repo: &str,
    tag: &str,
    port: u16,
    page: &str,
) -> anyhow::Result<String> {
    let base = busybox_rootfs()?.finish()?;
    let www = LayerBuilder::new()
        .dir("www", 0o755)?
        .file("www/index.html", page.as_bytes(), 0o644)?
        .finish()?;
    push_image(
        host,
        repo,
        tag,
        &[base, www],
        serde_json::json!({
            "Entrypoint": ["/bin/httpd", "-f", "-vv", "-p", port.to_string(), "-h", "/www"],
            "Env": ["PATH=/bin"],
        }),
    )
}

struct Reply {
    status: u16,
    location: Option<String>,
    body: String,
}

fn http(host: &str, method: &str, path: &str, ctype: &str, body: &[u8]) -> anyhow::Result<Reply> {
    let mut s = TcpStream::connect(host).with_context(|| format!("connecting to {host}"))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let location = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("location")
            .then(|| v.trim().to_owned())
    });
    Ok(Reply {
        status,
        location,
        body: body.to_owned(),
    })
}

/// Uploads one blob (monolithic: POST for a session, PUT with the digest).
pub fn push_blob(host: &str, repo: &str, data: &[u8]) -> anyhow::Result<String> {
    let d = sha256(data);
    let r = http(
        host,
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        "application/octet-stream",
        b"",
    )?;
    if r.status != 202 {
        bail!("starting an upload: HTTP {}: {}", r.status, r.body);
    }
    let loc = r.location.context("upload without a Location")?;
    let path = loc
        .strip_prefix(&format!("http://{host}"))
        .unwrap_or(&loc)
        .to_owned();
    let sep = if path.contains('?') { '&' } else { '?' };
    let r = http(
        host,
        "PUT",
        &format!("{path}{sep}digest={d}"),
        "application/octet-stream",
        data,
    )?;
    if r.status != 201 {
        bail!("finishing an upload: HTTP {}: {}", r.status, r.body);
    }
    Ok(d)
}

/// Pushes an image of `layers` (uncompressed tars, gzipped here) with the OCI `config`
/// object (`Entrypoint`, `Cmd`, `Env`, …); returns the manifest digest.
pub fn push_image(
    host: &str,
    repo: &str,
    tag: &str,
    layers: &[Vec<u8>],
    config: serde_json::Value,
) -> anyhow::Result<String> {
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        let gz = gzip(l);
        let d = push_blob(host, repo, &gz)?;
        descs.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": gz.len()}));
        diff_ids.push(sha256(l));
    }
    let cfg = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let cbytes = serde_json::to_vec(&cfg)?;
    let cd = push_blob(host, repo, &cbytes)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cbytes.len()},
        "layers": descs,
    }))?;
    let r = http(
        host,
        "PUT",
        &format!("/v2/{repo}/manifests/{tag}"),
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
    )?;
    if r.status != 201 {
        bail!("pushing the manifest: HTTP {}: {}", r.status, r.body);
    }
    Ok(sha256(&manifest))
}
