//! The CRI streaming server: `Exec` and `PortForward` answer a URL, and kubelet (proxying
//! `kubectl exec` / `kubectl port-forward`) connects to it and upgrades the connection to
//! SPDY/3.1 ([`aurae_client::spdy`]), the protocols Kubernetes speaks there:
//! `v4.channel.k8s.io` for exec (streams `error`, `stdin`, `stdout`, `stderr`; the exit as
//! a `Status` object on `error`) and `portforward.k8s.io` (a `data` and an `error` stream
//! per forwarded connection, paired by `requestID`).
//!
//! The URL's token is the only credential the connection carries, so it is what the CRI
//! call authorized: 244 random bits, good for one connection within [`TOKEN_TTL`]. What
//! it runs was authorized when the call was made, as the CRI identity: an exec is
//! `Executables/Exec` of the container's executable (run by
//! [`ExecutablesApi::exec_streaming`](crate::api::executable::ExecutablesApi::exec_streaming)
//! when the connection comes); a port-forward needs the same grant on the sandbox's cell
//! (it reaches no further than an exec could: the pod's own loopback). The server listens
//! on `--cri-stream-address` (default loopback: kubelet proxies to it). An exec whose
//! connection ends before its command does is killed (no session outlives its client).

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aurae_client::spdy::{self, FLAG_FIN, Frame, FrameReader, FrameWriter, Headers};
use aurae_proto::runtime::v0 as pb;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tonic::{Request, Status};
use tracing::{info, warn};

use crate::{
    api::executable::ExecutablesApi,
    cell::session::{OUTPUT_GRACE, end_of_input},
};

/// How long a URL may wait for its connection.
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// Most URLs waiting at once.
const MAX_PENDING: usize = 1024;
/// Most connections served at once.
const MAX_CONNECTIONS: usize = 256;
/// Most forwarded connections in one port-forward session.
const MAX_FORWARDS: usize = 128;
/// Largest HTTP request head.
const MAX_HEAD: usize = 16 << 10;
/// How long a client has to send its request head, and to open its streams.
const HANDSHAKE: Duration = Duration::from_secs(30);

pub const EXEC_PROTOCOL: &str = "v4.channel.k8s.io";
pub const PORT_FORWARD_PROTOCOL: &str = "portforward.k8s.io";

/// What a URL was issued for.
pub enum Pending {
    Exec {
        /// `Executables/Exec`, authorized as the CRI identity.
        request: Request<pb::ExecRequest>,
        /// The client of the sandbox's instance it runs in (None: a cell here).
        instance: Option<Box<aurae_client::Client>>,
        stdin: bool,
        stdout: bool,
        stderr: bool,
        /// A terminal: stdin and stdout through it (no stderr), and a `resize` stream.
        tty: bool,
    },
    Attach {
        /// `Executables/Attach` of the container's executable, its output from where its
        /// CRI log writer had got to when Attach was called; authorized then as the CRI
        /// identity.
        request: Request<pb::AttachStart>,
        /// The client of the sandbox's instance it runs in (None: a cell here).
        instance: Option<Box<aurae_client::Client>>,
        stdin: bool,
        stdout: bool,
        stderr: bool,
        /// The container has a terminal: its output is `stdout`, and a `resize` stream.
        tty: bool,
    },
    PortForward {
        sandbox: String,
        /// Where the pod's ports are, found when the call was made.
        to: Dial,
    },
}

/// Where a forwarded port is dialled.
#[derive(Debug, Clone)]
pub enum Dial {
    /// The pod's loopback, from inside its network namespace (a sandbox that is a cell).
    Netns(Arc<OwnedFd>),
    /// The pod's own address (a sandbox in an instance: the instance's address).
    Addr(std::net::IpAddr),
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pending::Exec { request, .. } => write!(f, "Exec({:?})", request.get_ref().argv),
            Pending::Attach { .. } => f.write_str("Attach"),
            Pending::PortForward { sandbox, .. } => write!(f, "PortForward({sandbox})"),
        }
    }
}

impl Pending {
    /// The URL path's first segment for it.
    fn kind(&self) -> &'static str {
        match self {
            Pending::Exec { .. } => "exec",
            Pending::Attach { .. } => "attach",
            Pending::PortForward { .. } => "portforward",
        }
    }
}

/// The URLs waiting for their connection, by token.
#[derive(Debug, Default)]
struct Tokens(Mutex<HashMap<String, (Instant, Pending)>>);

impl Tokens {
    /// A new token for `p`.
    fn issue(&self, p: Pending) -> Result<String, Status> {
        let token = super::new_id();
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, (at, _)| at.elapsed() < TOKEN_TTL);
        if m.len() >= MAX_PENDING {
            return Err(Status::resource_exhausted(format!(
                "{MAX_PENDING} streaming URLs are waiting for their connection: try again"
            )));
        }
        m.insert(token.clone(), (Instant::now(), p));
        Ok(token)
    }

    /// The token's request: once, within its time, for its kind only (a token is spent
    /// by any try).
    fn take(&self, kind: &str, token: &str) -> Option<Pending> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (at, p) = m.remove(token)?;
        (p.kind() == kind && at.elapsed() < TOKEN_TTL).then_some(p)
    }
}

/// The streaming server: its address and the URLs waiting for their connection.
#[derive(Debug)]
pub struct Streams {
    addr: SocketAddr,
    tokens: Tokens,
    executables: ExecutablesApi,
}

impl Streams {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Issues a URL for `p`: `http://<address>/<kind>/<token>`.
    pub fn issue(&self, p: Pending) -> Result<String, Status> {
        let kind = p.kind();
        let token = self.tokens.issue(p)?;
        Ok(format!("http://{}/{kind}/{token}", self.addr))
    }
}

/// Binds `addr` and serves until `shutdown`; the streams' address is the bound one.
pub async fn start(
    addr: SocketAddr,
    executables: ExecutablesApi,
    mut shutdown: tokio::sync::watch::Receiver<Option<Duration>>,
) -> anyhow::Result<Arc<Streams>> {
    use anyhow::Context as _;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --cri-stream-address {addr}"))?;
    let streams = Arc::new(Streams {
        addr: listener.local_addr()?,
        tokens: Tokens::default(),
        executables,
    });
    info!(address = %streams.addr, "CRI streaming server");
    let s = streams.clone();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.changed() => return,
            };
            let (conn, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    warn!("CRI streaming server: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                warn!(%peer, "CRI streaming server: {MAX_CONNECTIONS} connections already: refused");
                continue;
            };
            let s = s.clone();
            tokio::spawn(async move {
                let _slot = slot;
                if let Err(e) = s.serve(conn).await {
                    warn!(%peer, "CRI stream: {e}");
                }
            });
        }
    });
    Ok(streams)
}

/// An HTTP/1.1 request head, as far as the upgrade needs it.
#[derive(Debug)]
struct Head {
    path: String,
    headers: Vec<(String, String)>,
}

impl Head {
    /// Every value of `name` (comma-separated values split).
    fn values(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect()
    }
}

/// Reads a request head (bounded); returns it and what came after it.
async fn read_head(conn: &mut TcpStream) -> anyhow::Result<(Head, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() >= MAX_HEAD {
            anyhow::bail!("request head over {MAX_HEAD} bytes");
        }
        let mut chunk = [0u8; 2048];
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            anyhow::bail!("connection closed before the request head ended");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let rest = buf.split_off(end + 4);
    let text = std::str::from_utf8(&buf[..end])?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (_method, path, version) = (parts.next(), parts.next(), parts.next());
    let (Some(path), Some("HTTP/1.1")) = (path, version) else {
        anyhow::bail!("not an HTTP/1.1 request line: {line:?}");
    };
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok((
        Head {
            path: path.to_owned(),
            headers,
        },
        rest,
    ))
}

async fn respond(conn: &mut TcpStream, status: &str, body: &str) -> anyhow::Result<()> {
    let r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(r.as_bytes()).await?;
    Ok(())
}

impl Streams {
    async fn serve(&self, mut conn: TcpStream) -> anyhow::Result<()> {
        conn.set_nodelay(true)?;
        let (head, rest) = tokio::time::timeout(HANDSHAKE, read_head(&mut conn))
            .await
            .map_err(|_| anyhow::anyhow!("no request head within {HANDSHAKE:?}"))??;
        let path = head.path.split('?').next().unwrap_or_default();
        let mut seg = path.trim_start_matches('/').splitn(2, '/');
        let (kind, token) = (
            seg.next().unwrap_or_default(),
            seg.next().unwrap_or_default(),
        );
        let Some(pending) = self.tokens.take(kind, token) else {
            respond(
                &mut conn,
                "404 Not Found",
                "no such streaming session (a URL is good for one connection, within 60 s)\n",
            )
            .await?;
            return Ok(());
        };
        let upgrade = head.values("upgrade");
        if !upgrade
            .iter()
            .any(|u| u.eq_ignore_ascii_case(spdy::UPGRADE))
        {
            respond(
                &mut conn,
                "400 Bad Request",
                "only an Upgrade to SPDY/3.1 is served (WebSocket streaming is not built yet)\n",
            )
            .await?;
            return Ok(());
        }
        let want = match pending {
            Pending::Exec { .. } | Pending::Attach { .. } => EXEC_PROTOCOL,
            Pending::PortForward { .. } => PORT_FORWARD_PROTOCOL,
        };
        let offered = head.values("x-stream-protocol-version");
        if !offered.iter().any(|p| p == want) {
            respond(
                &mut conn,
                "403 Forbidden",
                &format!("this server speaks {want}; the client offered {offered:?}\n"),
            )
            .await?;
            return Ok(());
        }
        conn.write_all(
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {}\r\nX-Stream-Protocol-Version: {want}\r\n\r\n",
                spdy::UPGRADE
            )
            .as_bytes(),
        )
        .await?;
        let (r, w) = conn.into_split();
        let reader = FrameReader::new(std::io::Cursor::new(rest).chain(r));
        let (tx, writer) = frame_writer(FrameWriter::new(w)?);
        let result = match pending {
            Pending::Exec {
                request,
                instance,
                stdin,
                stdout,
                stderr,
                tty,
            } => {
                let streams = Wanted {
                    stdin,
                    stdout,
                    stderr: stderr && !tty,
                    tty,
                };
                self.exec(reader, tx.clone(), request, instance, streams)
                    .await
            }
            Pending::Attach {
                request,
                instance,
                stdin,
                stdout,
                stderr,
                tty,
            } => {
                let streams = Wanted {
                    stdin,
                    stdout,
                    stderr: stderr && !tty,
                    tty,
                };
                self.attach(reader, tx.clone(), request, instance, streams)
                    .await
            }
            Pending::PortForward { sandbox, to } => {
                port_forward(reader, tx.clone(), &sandbox, to).await
            }
        };
        let _ = tx
            .send(Out::Frame(Frame::GoAway {
                last_stream: 0,
                status: 0,
            }))
            .await;
        let _ = tx.send(Out::Close).await;
        drop(tx);
        let _ = writer.await;
        result
    }
}

/// What the writer task is asked to do.
enum Out {
    Frame(Frame),
    /// Shut the connection's write side down (after what was queued).
    Close,
}

type Tx = mpsc::Sender<Out>;

/// One task owns the writer (header blocks share one zlib stream: frames go out in the
/// order they were queued).
fn frame_writer(
    mut w: FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
) -> (Tx, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Out>(64);
    let task = tokio::spawn(async move {
        while let Some(o) = rx.recv().await {
            match o {
                Out::Frame(f) => {
                    if w.send(&f).await.is_err() {
                        return;
                    }
                }
                Out::Close => {
                    let _ = w.get_mut().shutdown().await;
                    return;
                }
            }
        }
    });
    (tx, task)
}

async fn send(tx: &Tx, f: Frame) -> bool {
    tx.send(Out::Frame(f)).await.is_ok()
}

/// Refuses a stream the session does not take.
async fn refuse(tx: &Tx, stream: u32) -> bool {
    send(
        tx,
        Frame::RstStream {
            stream,
            status: spdy::rst::REFUSED_STREAM,
        },
    )
    .await
}

async fn reply(tx: &Tx, stream: u32) -> bool {
    send(
        tx,
        Frame::SynReply {
            stream,
            flags: 0,
            headers: Vec::new(),
        },
    )
    .await
}

/// Writes `data` on `stream` in chunks; `fin` ends it.
async fn data(tx: &Tx, stream: u32, data: &[u8], fin: bool) -> bool {
    let mut chunks = data.chunks(spdy::DATA_CHUNK).peekable();
    if chunks.peek().is_none() {
        return send(
            tx,
            Frame::Data {
                stream,
                flags: if fin { FLAG_FIN } else { 0 },
                data: Vec::new(),
            },
        )
        .await;
    }
    while let Some(c) = chunks.next() {
        let last = chunks.peek().is_none();
        let flags = if fin && last { FLAG_FIN } else { 0 };
        if !send(
            tx,
            Frame::Data {
                stream,
                flags,
                data: c.to_vec(),
            },
        )
        .await
        {
            return false;
        }
    }
    true
}

type Reader =
    FrameReader<tokio::io::Chain<std::io::Cursor<Vec<u8>>, tokio::net::tcp::OwnedReadHalf>>;

/// The `streamtype` of a new stream.
fn stream_type(h: &Headers) -> &str {
    spdy::header(h, "streamtype").unwrap_or_default()
}

/// The exec's end as `v4.channel.k8s.io` reports it on the error stream.
fn exit_status_json(argv: &[String], code: i32) -> String {
    if code == 0 {
        return serde_json::json!({"metadata": {}, "status": "Success"}).to_string();
    }
    serde_json::json!({
        "metadata": {},
        "status": "Failure",
        "message": format!("command terminated with non-zero exit code: error executing command {argv:?}, exit code {code}"),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
    })
    .to_string()
}

fn failure_json(message: &str) -> String {
    serde_json::json!({"metadata": {}, "status": "Failure", "message": message}).to_string()
}

/// Copies a pipe (a terminal's master side, a forwarded connection) to a stream, then ends
/// the stream (at the end of the output, or EIO: no process holds the terminal any more).
async fn pump(mut rx: impl tokio::io::AsyncRead + Unpin, tx: Tx, stream: Option<u32>) {
    let mut buf = vec![0u8; spdy::DATA_CHUNK];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Some(s) = stream
                    && !data(&tx, s, &buf[..n], false).await
                {
                    return;
                }
            }
        }
    }
    if let Some(s) = stream {
        data(&tx, s, &[], true).await;
    }
}

/// The streams an exec's client opens (besides `error`).
#[derive(Debug, Clone, Copy)]
struct Wanted {
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

/// Window sizes as kubectl sends them on the `resize` stream: JSON objects, one after
/// another; the last complete one read is returned, the rest kept in `pending`.
fn last_size(pending: &mut Vec<u8>) -> Option<(u16, u16)> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Size {
        width: u16,
        height: u16,
    }
    let mut last = None;
    let mut used = 0;
    let mut it = serde_json::Deserializer::from_slice(pending).into_iter::<Size>();
    while let Some(Ok(sz)) = it.next() {
        used = it.byte_offset();
        last = Some((sz.width, sz.height));
    }
    pending.drain(..used);
    // Garbage that never parses is not kept growing.
    if pending.len() > 4096 {
        pending.clear();
    }
    last
}

impl Streams {
    async fn exec(
        &self,
        reader: Reader,
        tx: Tx,
        request: Request<pb::ExecRequest>,
        via: Option<Box<aurae_client::Client>>,
        want: Wanted,
    ) -> anyhow::Result<()> {
        let argv = request.get_ref().argv.clone();
        let stdio = if want.tty {
            crate::cell::exec::ExecStdio::Terminal
        } else {
            crate::cell::exec::ExecStdio::Pipes { stdin: want.stdin }
        };
        let start = async move {
            match via {
                None => match self.executables.exec_streaming(request, stdio).await {
                    Ok(p) => crate::cell::session::Session::local(p)
                        .map_err(|e| Status::internal(e.to_string())),
                    Err(e) => Err(e),
                },
                Some(client) => {
                    super::place::instance_session(&client, request.into_inner(), stdio).await
                }
            }
        };
        run_session(reader, tx, want, start, |code| {
            exit_status_json(&argv, code)
        })
        .await
    }

    /// An attach: the container's own stdio (its output from when Attach was called, its
    /// input with `stdin`, its terminal's size), until its output ends (it exited:
    /// `Success` on `error`, as kubelet's own streaming server reports an attach) or the
    /// client leaves (the container runs on).
    async fn attach(
        &self,
        reader: Reader,
        tx: Tx,
        request: Request<pb::AttachStart>,
        via: Option<Box<aurae_client::Client>>,
        want: Wanted,
    ) -> anyhow::Result<()> {
        let start = async move {
            match via {
                None => {
                    let start = request.get_ref().clone();
                    self.executables
                        .attach_session(&request, &start)
                        .map(|(s, _)| s)
                }
                Some(client) => {
                    super::place::instance_attach(&client, request.into_inner(), want.tty).await
                }
            }
        };
        run_session(reader, tx, want, start, |_| {
            serde_json::json!({"metadata": {}, "status": "Success"}).to_string()
        })
        .await
    }
}

/// Serves one exec or attach over its SPDY connection: the client's streams opened, the
/// session started, then its input, terminal sizes and pings copied in and its output
/// out until it ends (`end` of its exit code on the `error` stream) or the client leaves
/// (an exec's command is killed; an attach detaches).
async fn run_session(
    mut reader: Reader,
    tx: Tx,
    want: Wanted,
    start: impl std::future::Future<Output = Result<crate::cell::session::Session, Status>>,
    end: impl FnOnce(i32) -> String,
) -> anyhow::Result<()> {
    let ids = open_streams(
        &mut reader,
        &tx,
        &[
            ("error", true),
            ("stdin", want.stdin),
            ("stdout", want.stdout),
            ("stderr", want.stderr),
            ("resize", want.tty),
        ],
    )
    .await?;
    let error = ids["error"];
    let session = match start.await {
        Ok(s) => s,
        Err(e) => {
            data(&tx, error, failure_json(e.message()).as_bytes(), true).await;
            for s in ["stdout", "stderr"].iter().filter_map(|n| ids.get(n)) {
                data(&tx, *s, &[], true).await;
            }
            return Ok(());
        }
    };
    info!(session = %session.what, tty = want.tty, "CRI stream: started");
    let crate::cell::session::Session {
        stdout,
        stderr,
        stdin: mut stdin_w,
        resize,
        mut exit,
        kill,
        detaches,
        what,
    } = session;
    // An attach's end of input ends its writing only (no EOF character into a terminal).
    let eof_char = resize.is_some() && !detaches;
    let (stdout_id, stderr_id) = (ids.get("stdout").copied(), ids.get("stderr").copied());
    let mut pumps = Vec::new();
    for (r, id) in [(stdout, stdout_id), (stderr, stderr_id)] {
        if let Some(r) = r {
            pumps.push(tokio::spawn(pump(r, tx.clone(), id)));
        }
    }
    let stdin_id = ids.get("stdin").copied();
    let resize_id = ids.get("resize").copied();
    let mut stdin_open = want.stdin;
    if !want.stdin {
        stdin_w = None;
    }
    let mut sizes = Vec::new();
    // The client's frames until the session ends: stdin, sizes, pings, its leaving.
    // The client's frames on a task of their own (a frame read is not cancel-safe, so it
    // must not race anything): into a channel, and `gone` once the client has left, so
    // a write into a stdin nobody reads races the client's leaving too.
    let (frames_tx, mut frames) = mpsc::channel::<Frame>(64);
    let (gone_tx, gone) = tokio::sync::watch::channel(false);
    let _reading = AbortOnDrop(tokio::spawn(async move {
        loop {
            match reader.next().await {
                Ok(Some(f)) => {
                    if frames_tx.send(f).await.is_err() {
                        return;
                    }
                }
                Ok(None) | Err(_) => {
                    let _ = gone_tx.send(true);
                    return;
                }
            }
        }
    }));
    let left = || {
        let mut g = gone.clone();
        async move {
            let _ = g.wait_for(|gone| *gone).await;
        }
    };
    // Its end, or None: the client left first.
    let ended = loop {
        tokio::select! {
            s = &mut exit => break Some(s),
            f = frames.recv() => match f {
                Some(Frame::Data { stream, flags, data }) if Some(stream) == stdin_id => {
                    // A command that does not read its input must not hide its end or
                    // its client's leaving: the write races both.
                    if stdin_open && let Some(w) = stdin_w.as_mut() {
                        tokio::select! {
                            r = w.write_all(&data) => if r.is_err() {
                                stdin_open = false;
                                stdin_w = None;
                            },
                            s = &mut exit => break Some(s),
                            () = left() => break None,
                        }
                    }
                    if flags & FLAG_FIN != 0 {
                        if stdin_open {
                            end_of_input(&mut stdin_w, eof_char).await;
                        } else {
                            stdin_w = None;
                        }
                        stdin_open = false;
                    }
                }
                Some(Frame::Data { stream, data, .. }) if Some(stream) == resize_id => {
                    sizes.extend_from_slice(&data);
                    if let (Some((w, h)), Some(resize)) = (last_size(&mut sizes), &resize) {
                        resize(w, h);
                    }
                }
                Some(Frame::RstStream { stream, .. }) if Some(stream) == stdin_id => {
                    if !eof_char {
                        stdin_w = None;
                    }
                    stdin_open = false;
                }
                Some(Frame::Ping { id }) => {
                    send(&tx, Frame::Ping { id }).await;
                }
                Some(Frame::SynStream { stream, .. }) => {
                    refuse(&tx, stream).await;
                }
                Some(_) => {}
                None => break None,
            },
        }
    };
    let Some(status) = ended else {
        // The client is gone: an exec's command goes too; an attach lets go.
        kill();
        for p in &pumps {
            p.abort();
        }
        drop(stdin_w);
        if detaches {
            info!(session = %what, "CRI stream: the client detached");
        } else {
            let _ = exit.await;
            warn!(session = %what, "CRI stream: the client left before its exec ended: killed");
        }
        return Ok(());
    };
    drop(stdin_w);
    let drained = tokio::time::timeout(OUTPUT_GRACE, async {
        for p in &mut pumps {
            let _ = p.await;
        }
    })
    .await;
    if drained.is_err() {
        // Something the command started still holds its output: the stream ends
        // here all the same.
        for p in &pumps {
            p.abort();
        }
        for s in [stdout_id, stderr_id].into_iter().flatten() {
            data(&tx, s, &[], true).await;
        }
    }
    let code = match status {
        Some(aurae_sys::ExitStatus::Code(c)) => c,
        Some(aurae_sys::ExitStatus::Signal(s)) => 128 + s,
        None => 255,
    };
    data(&tx, error, end(code).as_bytes(), true).await;
    Ok(())
}

/// Waits (at most [`HANDSHAKE`]) for the client to open the streams `wanted` marks (by
/// their `streamtype`), answering each; any other is refused. Their ids by type.
async fn open_streams(
    reader: &mut Reader,
    tx: &Tx,
    wanted: &[(&'static str, bool)],
) -> anyhow::Result<HashMap<&'static str, u32>> {
    let wanted: Vec<&'static str> = wanted.iter().filter(|(_, w)| *w).map(|(n, _)| *n).collect();
    let mut ids: HashMap<&'static str, u32> = HashMap::new();
    let opened = tokio::time::timeout(HANDSHAKE, async {
        while ids.len() < wanted.len() {
            let Some(f) = reader.next().await? else {
                anyhow::bail!("the client left before opening its streams");
            };
            match f {
                Frame::SynStream {
                    stream, headers, ..
                } => match wanted.iter().find(|w| **w == stream_type(&headers)) {
                    Some(w) if !ids.contains_key(w) => {
                        ids.insert(w, stream);
                        reply(tx, stream).await;
                    }
                    _ => {
                        refuse(tx, stream).await;
                    }
                },
                Frame::Ping { id } => {
                    send(tx, Frame::Ping { id }).await;
                }
                _ => {}
            }
        }
        Ok(())
    })
    .await;
    match opened {
        Ok(r) => r.map(|()| ids),
        Err(_) => anyhow::bail!("the client opened {ids:?} of {wanted:?} within {HANDSHAKE:?}"),
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Opens a TCP connection to the pod's `port`: at its own address, or on its loopback
/// from inside its network namespace (a thread of its own enters it, connects, and ends:
/// no thread of auraed's stays there).
async fn dial(to: Dial, port: u16) -> std::io::Result<TcpStream> {
    let netns = match to {
        Dial::Addr(ip) => {
            let at = SocketAddr::from((ip, port));
            return tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(at))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?;
        }
        Dial::Netns(n) => n,
    };
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("cri-portforward".into())
        .spawn(move || {
            let r = nix::sched::setns(netns.as_ref(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
                .and_then(|()| {
                    let timeout = Duration::from_secs(10);
                    std::net::TcpStream::connect_timeout(
                        &SocketAddr::from(([127, 0, 0, 1], port)),
                        timeout,
                    )
                    .or_else(|e| {
                        std::net::TcpStream::connect_timeout(
                            &SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
                            timeout,
                        )
                        .map_err(|_| e)
                    })
                })
                .and_then(|s| s.set_nonblocking(true).map(|()| s));
            let _ = done.send(r);
        })?;
    let s = result
        .await
        .map_err(|_| std::io::Error::other("the dialing thread ended"))??;
    TcpStream::from_std(s)
}

/// One forwarded connection's streams, as they arrive.
#[derive(Default)]
struct Pair {
    port: u16,
    error: Option<u32>,
    data: Option<u32>,
    /// Data from the client for the connection (set once it runs).
    to_pod: Option<mpsc::Sender<Option<Vec<u8>>>>,
}

async fn port_forward(mut reader: Reader, tx: Tx, sandbox: &str, to: Dial) -> anyhow::Result<()> {
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    // Stream id → request id.
    let mut by_stream: HashMap<u32, String> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let f = tokio::select! {
            f = reader.next() => f,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        match f {
            Ok(Some(Frame::SynStream {
                stream, headers, ..
            })) => {
                let kind = stream_type(&headers).to_owned();
                let request = spdy::header(&headers, "requestid")
                    .unwrap_or_default()
                    .to_owned();
                let port = spdy::header(&headers, "port").and_then(|p| p.parse::<u16>().ok());
                if !matches!(kind.as_str(), "data" | "error")
                    || request.is_empty()
                    || (pairs.len() >= MAX_FORWARDS && !pairs.contains_key(&request))
                {
                    refuse(&tx, stream).await;
                    continue;
                }
                reply(&tx, stream).await;
                by_stream.insert(stream, request.clone());
                let p = pairs.entry(request.clone()).or_default();
                if kind == "data" {
                    p.data = Some(stream);
                } else {
                    p.error = Some(stream);
                }
                match port {
                    Some(port) if port > 0 => p.port = port,
                    _ => {
                        if let Some(e) = p.error {
                            data(&tx, e, b"the port header is missing or not a port", true).await;
                        }
                        continue;
                    }
                }
                let (Some(error), Some(data_id), None) = (p.error, p.data, &p.to_pod) else {
                    continue;
                };
                let (to_pod, from_client) = mpsc::channel(16);
                p.to_pod = Some(to_pod);
                let port = p.port;
                tasks.spawn(forward(
                    to.clone(),
                    port,
                    tx.clone(),
                    error,
                    data_id,
                    from_client,
                    sandbox.to_owned(),
                ));
            }
            Ok(Some(Frame::Data {
                stream,
                flags,
                data,
            })) => {
                let Some(p) = by_stream.get(&stream).and_then(|r| pairs.get(r)) else {
                    continue;
                };
                if p.data != Some(stream) {
                    continue;
                }
                if let Some(to) = &p.to_pod {
                    if !data.is_empty() {
                        let _ = to.send(Some(data)).await;
                    }
                    if flags & FLAG_FIN != 0 {
                        let _ = to.send(None).await;
                    }
                }
            }
            Ok(Some(Frame::RstStream { stream, .. })) => {
                if let Some(r) = by_stream.remove(&stream) {
                    // Dropping the sender ends that connection's copy to the pod.
                    if let Some(p) = pairs.get_mut(&r) {
                        p.to_pod = None;
                    }
                }
            }
            Ok(Some(Frame::Ping { id })) => {
                send(&tx, Frame::Ping { id }).await;
            }
            Ok(Some(Frame::GoAway { .. })) | Ok(None) | Err(_) => break,
            Ok(Some(_)) => {}
        }
    }
    tasks.shutdown().await;
    Ok(())
}

/// One forwarded connection: dial, then copy both ways until both sides are done.
async fn forward(
    to: Dial,
    port: u16,
    tx: Tx,
    error: u32,
    data_id: u32,
    mut from_client: mpsc::Receiver<Option<Vec<u8>>>,
    sandbox: String,
) {
    let conn = match dial(to, port).await {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("forwarding port {port} of sandbox {sandbox}: {e}");
            data(&tx, error, msg.as_bytes(), true).await;
            data(&tx, data_id, &[], true).await;
            return;
        }
    };
    let (r, mut w) = conn.into_split();
    let up = async {
        while let Some(Some(chunk)) = from_client.recv().await {
            if w.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    };
    let down = pump(r, tx.clone(), Some(data_id));
    tokio::join!(up, down);
    data(&tx, error, &[], true).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn forward() -> Pending {
        Pending::PortForward {
            sandbox: "s".into(),
            to: Dial::Netns(Arc::new(
                std::fs::File::open("/proc/self/ns/net").unwrap().into(),
            )),
        }
    }

    #[test]
    fn a_token_is_good_once_for_its_kind_within_its_time() {
        let t = Tokens::default();
        let a = t.issue(forward()).unwrap();
        assert_eq!(a.len(), 64);
        assert!(t.take("exec", &a).is_none(), "another kind");
        assert!(
            t.take("portforward", &a).is_none(),
            "spent by the wrong try"
        );
        let b = t.issue(forward()).unwrap();
        assert_ne!(a, b);
        assert!(t.take("portforward", &b).is_some());
        assert!(t.take("portforward", &b).is_none(), "once");
        let c = t.issue(forward()).unwrap();
        if let Some(e) = t.0.lock().unwrap().get_mut(&c) {
            e.0 = Instant::now().checked_sub(TOKEN_TTL).unwrap();
        }
        assert!(t.take("portforward", &c).is_none(), "expired");
        for _ in 0..MAX_PENDING {
            t.issue(forward()).unwrap();
        }
        let full = t.issue(forward()).unwrap_err();
        assert_eq!(full.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn window_sizes_are_read_as_kubectl_sends_them() {
        let mut p = br#"{"Width":80,"Height":24}{"Width":100,"Height":"#.to_vec();
        assert_eq!(last_size(&mut p), Some((80, 24)));
        p.extend_from_slice(b"30}\n");
        assert_eq!(last_size(&mut p), Some((100, 30)));
        assert_eq!(last_size(&mut p), None);
        let mut junk = vec![b'x'; 5000];
        assert_eq!(last_size(&mut junk), None);
        assert!(junk.is_empty(), "garbage is not kept");
    }

    #[test]
    fn exits_are_reported_as_kubernetes_status_objects() {
        let ok: serde_json::Value = serde_json::from_str(&exit_status_json(&[], 0)).unwrap();
        assert_eq!(ok["status"], "Success");
        let v: serde_json::Value =
            serde_json::from_str(&exit_status_json(&["sh".into()], 3)).unwrap();
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(v["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(v["details"]["causes"][0]["message"], "3");
    }
}
