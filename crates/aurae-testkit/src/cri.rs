//! Clients of auraed's Kubernetes CRI (`--cri-socket`): plain gRPC over the Unix socket,
//! as kubelet connects.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use aurae_proto::cri::v1::{
    self as cri, image_service_client::ImageServiceClient,
    runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::Channel;

/// The CRI's runtime and image clients on one connection to the socket at `path`.
pub async fn clients(
    path: &Path,
) -> anyhow::Result<(RuntimeServiceClient<Channel>, ImageServiceClient<Channel>)> {
    let path = path.to_owned();
    let ch = tonic::transport::Endpoint::from_static("http://cri.local")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await?;
    Ok((
        RuntimeServiceClient::new(ch.clone()),
        ImageServiceClient::new(ch),
    ))
}

/// What a streamed exec gave back: its output and the `Status` object its `error` stream
/// carried (`{"status":"Success"}`, or a failure with its exit code), as `kubectl exec`
/// reads them.
#[derive(Debug, Default)]
pub struct Streamed {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: String,
}

impl Streamed {
    /// The exit code the status reports (0 for Success).
    pub fn exit_code(&self) -> Option<i32> {
        let v: serde_json::Value = serde_json::from_str(&self.status).ok()?;
        if v["status"] == "Success" {
            return Some(0);
        }
        v["details"]["causes"]
            .as_array()?
            .iter()
            .find(|c| c["reason"] == "ExitCode")?["message"]
            .as_str()?
            .parse()
            .ok()
    }
}

/// Connects to a streaming URL (`http://host:port/path`) and upgrades to SPDY/3.1 offering
/// `protocol`, as client-go's SPDY round tripper does. The refusal's status line and body
/// as the error when the server does not switch.
pub async fn upgrade(
    url: &str,
    protocol: &str,
) -> anyhow::Result<(
    aurae_client::spdy::FrameReader<
        tokio::io::Chain<std::io::Cursor<Vec<u8>>, tokio::net::tcp::OwnedReadHalf>,
    >,
    aurae_client::spdy::FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("not an http URL: {url}"))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut conn = tokio::net::TcpStream::connect(host).await?;
    conn.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
             X-Stream-Protocol-Version: {protocol}\r\nContent-Length: 0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 1024];
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            anyhow::bail!(
                "closed before a response: {}",
                String::from_utf8_lossy(&buf)
            );
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut rest = buf.split_off(end + 4);
    let head = String::from_utf8_lossy(&buf).to_lowercase();
    let status = head.lines().next().unwrap_or_default().to_owned();
    if !status.starts_with("http/1.1 101")
        || !head.contains("upgrade: spdy/3.1")
        || !head.contains(&format!("x-stream-protocol-version: {protocol}"))
    {
        // The body of a refusal (Connection: close): read it whole.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            conn.read_to_end(&mut rest),
        )
        .await;
        anyhow::bail!("{status}: {}", String::from_utf8_lossy(&rest).trim());
    }
    let (r, w) = conn.into_split();
    Ok((
        aurae_client::spdy::FrameReader::new(std::io::Cursor::new(rest).chain(r)),
        aurae_client::spdy::FrameWriter::new(w)?,
    ))
}

/// The data the server writes on streams `ids`, each read until it ends (FIN) or the
/// connection does.
async fn read_streams(
    r: &mut aurae_client::spdy::FrameReader<
        tokio::io::Chain<std::io::Cursor<Vec<u8>>, tokio::net::tcp::OwnedReadHalf>,
    >,
    ids: &[u32],
) -> anyhow::Result<std::collections::HashMap<u32, Vec<u8>>> {
    use aurae_client::spdy::{FLAG_FIN, Frame};
    let mut got: std::collections::HashMap<u32, Vec<u8>> =
        ids.iter().map(|i| (*i, Vec::new())).collect();
    let mut open: std::collections::HashSet<u32> = ids.iter().copied().collect();
    while !open.is_empty() {
        let Some(f) = r.next().await? else { break };
        if let Frame::Data {
            stream,
            flags,
            data,
        } = f
        {
            if let Some(buf) = got.get_mut(&stream) {
                buf.extend(data);
            }
            if flags & FLAG_FIN != 0 {
                open.remove(&stream);
            }
        }
    }
    Ok(got)
}

/// Runs a CRI Exec URL to its end as `kubectl exec` does (`v4.channel.k8s.io`): streams
/// `error`, then `stdin` (when `stdin` is given: written, then closed), `stdout`,
/// `stderr`; reads until every stream the server writes has ended.
pub async fn exec_stream(url: &str, stdin: Option<&[u8]>) -> anyhow::Result<Streamed> {
    exec_stream_with(url, stdin, None).await
}

/// [`exec_stream`], with a terminal of `size` (columns, rows) when given, as `kubectl
/// exec -t` asks: no `stderr` stream, a `resize` stream carrying the size first.
pub async fn exec_stream_with(
    url: &str,
    stdin: Option<&[u8]>,
    size: Option<(u16, u16)>,
) -> anyhow::Result<Streamed> {
    use aurae_client::spdy::{FLAG_FIN, Frame};
    let (mut r, mut w) = upgrade(url, "v4.channel.k8s.io").await?;
    open_exec_streams(&mut w, stdin.is_some(), size).await?;
    if let Some(input) = stdin {
        for c in input.chunks(aurae_client::spdy::DATA_CHUNK) {
            w.send(&Frame::Data {
                stream: 3,
                flags: 0,
                data: c.to_vec(),
            })
            .await?;
        }
        w.send(&Frame::Data {
            stream: 3,
            flags: FLAG_FIN,
            data: Vec::new(),
        })
        .await?;
    }
    let ids: &[u32] = if size.is_some() { &[1, 5] } else { &[1, 5, 7] };
    let mut got = read_streams(&mut r, ids).await?;
    let mut take = |id| got.remove(&id).unwrap_or_default();
    Ok(Streamed {
        status: String::from_utf8_lossy(&take(1)).into_owned(),
        stdout: take(5),
        stderr: take(7),
    })
}

/// Attaches through a CRI Attach URL as `kubectl attach -i` does (streams `error`,
/// `stdin`, `stdout`, and `stderr` or with a terminal of `size` a `resize` stream), writes
/// `input` (its stdin left open), reads until the output holds `want`, then leaves (the
/// container runs on); the output read. An error if `want` does not come `within`.
pub async fn attach_until(
    url: &str,
    input: &[u8],
    size: Option<(u16, u16)>,
    want: &str,
    within: std::time::Duration,
) -> anyhow::Result<String> {
    Ok(attach_open(url, input, size, want, within).await?.output)
}

/// An attach still connected (dropping it leaves).
#[allow(missing_debug_implementations)] // the connection's halves are not Debug
pub struct Attached {
    /// What it read until what was wanted came.
    pub output: String,
    _reader: aurae_client::spdy::FrameReader<
        tokio::io::Chain<std::io::Cursor<Vec<u8>>, tokio::net::tcp::OwnedReadHalf>,
    >,
    _writer: aurae_client::spdy::FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
}

/// [`attach_until`], staying connected: the attach ends when the result is dropped.
pub async fn attach_open(
    url: &str,
    input: &[u8],
    size: Option<(u16, u16)>,
    want: &str,
    within: std::time::Duration,
) -> anyhow::Result<Attached> {
    use aurae_client::spdy::Frame;
    let (mut r, mut w) = upgrade(url, "v4.channel.k8s.io").await?;
    open_exec_streams(&mut w, true, size).await?;
    w.send(&Frame::Data {
        stream: 3,
        flags: 0,
        data: input.to_vec(),
    })
    .await?;
    let mut out = Vec::new();
    let mut status = Vec::new();
    let read = tokio::time::timeout(within, async {
        while !String::from_utf8_lossy(&out).contains(want) {
            match r.next().await? {
                Some(Frame::Data {
                    stream: 5, data, ..
                }) => out.extend(data),
                Some(Frame::Data {
                    stream: 1, data, ..
                }) => status.extend(data),
                Some(_) => {}
                None => break,
            }
        }
        anyhow::Ok(())
    })
    .await;
    let text = String::from_utf8_lossy(&out).into_owned();
    match read {
        Ok(Ok(())) if text.contains(want) => Ok(Attached {
            output: text,
            _reader: r,
            _writer: w,
        }),
        Ok(r) => anyhow::bail!(
            "the attach ended ({r:?}, status {:?}) without {want:?}: {text:?}",
            String::from_utf8_lossy(&status)
        ),
        Err(_) => anyhow::bail!("no {want:?} within {within:?}: {text:?}"),
    }
}

/// Opens the streams kubectl opens for an exec or attach: `error` (1), `stdin` (3) when
/// `stdin`, `stdout` (5), and `stderr` (7) or with a terminal of `size` (columns, rows) a
/// `resize` stream (9) carrying the size first.
async fn open_exec_streams(
    w: &mut aurae_client::spdy::FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
    stdin: bool,
    size: Option<(u16, u16)>,
) -> anyhow::Result<()> {
    use aurae_client::spdy::Frame;
    let mut kinds = vec![("error", 1u32)];
    if stdin {
        kinds.push(("stdin", 3));
    }
    kinds.push(("stdout", 5));
    kinds.push(if size.is_some() {
        ("resize", 9)
    } else {
        ("stderr", 7)
    });
    for (kind, id) in &kinds {
        w.send(&Frame::SynStream {
            stream: *id,
            associated: 0,
            flags: 0,
            headers: vec![("streamtype".into(), (*kind).into())],
        })
        .await?;
    }
    if let Some((cols, rows)) = size {
        w.send(&Frame::Data {
            stream: 9,
            flags: 0,
            data: format!("{{\"Width\":{cols},\"Height\":{rows}}}\n").into_bytes(),
        })
        .await?;
    }
    Ok(())
}

/// One connection through a CRI PortForward URL (`portforward.k8s.io`), as `kubectl
/// port-forward` makes it: an error stream (closed at once on our side) and a data stream
/// for `port`, `request` written, then the data stream closed; returns what came back
/// and what the error stream said.
pub async fn port_forward_once(
    url: &str,
    port: u16,
    request: &[u8],
) -> anyhow::Result<(Vec<u8>, String)> {
    use aurae_client::spdy::{FLAG_FIN, Frame};
    let (mut r, mut w) = upgrade(url, "portforward.k8s.io").await?;
    let headers = |kind: &str| {
        vec![
            ("streamtype".to_owned(), kind.to_owned()),
            ("port".to_owned(), port.to_string()),
            ("requestid".to_owned(), "0".to_owned()),
        ]
    };
    w.send(&Frame::SynStream {
        stream: 1,
        associated: 0,
        flags: 0,
        headers: headers("error"),
    })
    .await?;
    w.send(&Frame::Data {
        stream: 1,
        flags: FLAG_FIN,
        data: Vec::new(),
    })
    .await?;
    w.send(&Frame::SynStream {
        stream: 3,
        associated: 0,
        flags: 0,
        headers: headers("data"),
    })
    .await?;
    w.send(&Frame::Data {
        stream: 3,
        flags: 0,
        data: request.to_vec(),
    })
    .await?;
    w.send(&Frame::Data {
        stream: 3,
        flags: FLAG_FIN,
        data: Vec::new(),
    })
    .await?;
    let mut got = read_streams(&mut r, &[1, 3]).await?;
    let data = got.remove(&3).unwrap_or_default();
    let error = got.remove(&1).unwrap_or_default();
    Ok((data, String::from_utf8_lossy(&error).into_owned()))
}

/// A sandbox's configuration as kubelet sends one: `default/<name>`, pod uid `uid`,
/// hostname `<name>-0`, its logs under `log_dir`, a label and an annotation.
pub fn sandbox_config(name: &str, uid: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_owned(),
            uid: uid.to_owned(),
            namespace: "default".to_owned(),
            attempt: 0,
        }),
        hostname: format!("{name}-0"),
        log_directory: log_dir.display().to_string(),
        labels: [("app".to_owned(), name.to_owned())].into(),
        annotations: [("note".to_owned(), "from the test".to_owned())].into(),
        ..Default::default()
    }
}

/// A container `name` of `image` running `/bin/sh -c script` (none: the image's command),
/// with `GREETING=hello`, logging to `<name>/0.log` in the sandbox's log directory.
pub fn container_config(name: &str, image: &str, script: Option<&str>) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.to_owned(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.to_owned(),
            ..Default::default()
        }),
        command: script.map_or_else(Vec::new, |s| {
            vec!["/bin/sh".to_owned(), "-c".to_owned(), s.to_owned()]
        }),
        envs: vec![cri::KeyValue {
            key: "GREETING".to_owned(),
            value: "hello".to_owned(),
        }],
        log_path: format!("{name}/0.log"),
        labels: [("c".to_owned(), name.to_owned())].into(),
        ..Default::default()
    }
}

/// CreateContainer of `c` in `sandbox`, its log's directory made under the sandbox's
/// `log_dir` first (as kubelet makes it); the container's id.
pub async fn create_container(
    rt: &mut RuntimeServiceClient<Channel>,
    sandbox: &str,
    c: cri::ContainerConfig,
    sb: &cri::PodSandboxConfig,
    log_dir: &Path,
) -> Result<String, tonic::Status> {
    if let Some(dir) = Path::new(&c.log_path).parent() {
        std::fs::create_dir_all(log_dir.join(dir))
            .map_err(|e| tonic::Status::internal(format!("making the log directory: {e}")))?;
    }
    rt.create_container(cri::CreateContainerRequest {
        pod_sandbox_id: sandbox.to_owned(),
        config: Some(c),
        sandbox_config: Some(sb.clone()),
    })
    .await
    .map(|r| r.into_inner().container_id)
}

/// ContainerStatus of `id`.
pub async fn container_status(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
) -> Result<cri::ContainerStatus, tonic::Status> {
    rt.container_status(cri::ContainerStatusRequest {
        container_id: id.to_owned(),
        verbose: false,
    })
    .await?
    .into_inner()
    .status
    .ok_or_else(|| tonic::Status::internal("ContainerStatus without a status"))
}

/// PodSandboxStatus of `id`.
pub async fn sandbox_status(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
) -> Result<cri::PodSandboxStatus, tonic::Status> {
    rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
        pod_sandbox_id: id.to_owned(),
        verbose: false,
    })
    .await?
    .into_inner()
    .status
    .ok_or_else(|| tonic::Status::internal("PodSandboxStatus without a status"))
}

/// ExecSync of `cmd` in `id` (10 s timeout).
pub async fn exec_sync(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
    cmd: &[&str],
) -> Result<cri::ExecSyncResponse, tonic::Status> {
    rt.exec_sync(cri::ExecSyncRequest {
        container_id: id.to_owned(),
        cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
        timeout: 10,
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Waits (at most `within`) until the CRI log at `path` has a line ending in `want`; all
/// its lines.
pub async fn log_has(path: &Path, want: &str, within: Duration) -> anyhow::Result<Vec<String>> {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.iter().any(|l| l.ends_with(want)) {
            return Ok(lines);
        }
        if t.elapsed() > within {
            anyhow::bail!(
                "{} has no line ending in {want:?} after {within:?}: {text}",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
