//! Prometheus metrics: `GET /metrics` in the text exposition format 0.0.4, over plain
//! HTTP/1.1 on `--metrics-listen` (off by default; the endpoint has no authentication, so
//! auraed warns when the address is not loopback).
//!
//! What a scrape shows (naming after cAdvisor, `aurae_` prefix, base units, `_total` on
//! counters; memory is `…_memory_usage_bytes` = `memory.current`, not a working set):
//!
//! - cells (`cell="a/b"`, the full nested name; a cell's cgroup figures include its
//!   nested cells): CPU usage/user/system and throttling from `cpu.stat`, memory
//!   current/peak/limit, pids current/limit, IO bytes (`io.stat`), OOM kills, phase;
//!   families of a controller cells do not have here (memory, pids, io, cpu throttling)
//!   are left out rather than shown as 0;
//! - executables (`cell`, `executable`): their process's own CPU, resident memory and
//!   peak, threads and IO bytes from `/proc`, and phase (limits, throttling and OOM kills
//!   belong to the cell's cgroup: see the cell's series);
//! - VMs: the VMM process's CPU, each vCPU thread's CPU, the VMM's resident memory, the
//!   configured vCPUs and memory, phase (the VMM counts its VM exits but does not report
//!   them to auraed: no exit metric);
//! - instances and pods: counts by phase, and their cgroup's CPU and memory;
//! - API calls, counted for every call that reaches the gRPC router (authorization
//!   refusals included): started, handled by code, and a latency histogram;
//! - image pulls by result and bytes fetched from registries;
//! - auraed itself: `aurae_build_info`, and the standard `process_*` series.
//!
//! A scrape reads cgroup and /proc files on a blocking thread, one scrape at a time,
//! within [`SCRAPE_TIMEOUT`]; the listener serves at most [`MAX_CONNECTIONS`] connections,
//! each for at most [`CONNECTION_LIFETIME`], with [`HEADER_READ_TIMEOUT`] to send its
//! request head.

use std::{
    collections::{BTreeSet, HashMap},
    convert::Infallible,
    fmt::Write as _,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::{net::TcpListener, sync::Semaphore};
use tower::{Layer, Service};
use tracing::{debug, error, warn};

use crate::{
    cell::{CellStats, Cells},
    instance::{Instances, Isolation},
    pod::Pods,
    vm::Vms,
    workload::Phase,
};

/// Most connections to the metrics listener at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a client has to send its request head (each request of a connection).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may stay open, whatever it does (a slow reader included).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// How long a scrape may wait for the one before it and take to collect.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// The request head buffer (hyper's minimum is 8 KiB).
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// The exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

// ---------------------------------------------------------------------------------------
// The encoder.

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// A sample value: integers are written exactly, floats in Prometheus' spelling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Self::Int(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Self::Float(v)
    }
}

fn write_float(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v == f64::INFINITY {
        out.push_str("+Inf");
    } else if v == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        // Rust's Display never uses an exponent and round-trips: "0.001", "3", "1.5".
        let _ = write!(out, "{v}");
    }
}

fn write_value(out: &mut String, v: Value) {
    match v {
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Float(f) => write_float(out, f),
    }
}

/// A label value as the format wants it: `\` → `\\`, `"` → `\"`, newline → `\n`.
pub fn escape_label_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// HELP text: `\` → `\\`, newline → `\n`.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub fn valid_metric_name(n: &str) -> bool {
    let mut b = n.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__` (reserved).
pub fn valid_label_name(n: &str) -> bool {
    let mut b = n.bytes();
    !n.starts_with("__")
        && b.next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// Writes the text format: every family once (HELP and TYPE before its first sample,
/// samples together), names checked, label values escaped.
#[derive(Debug, Default)]
pub struct Encoder {
    out: String,
    written: BTreeSet<String>,
}

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the family `name`; its HELP and TYPE are written with its first sample (a
    /// family without samples writes nothing). A name that is invalid, already written,
    /// or a counter's without `_total` is a bug here: logged, its samples dropped.
    pub fn family<'a>(&'a mut self, name: &'a str, help: &'a str, kind: Kind) -> Family<'a> {
        let broken = if !valid_metric_name(name) {
            Some("is not a valid metric name")
        } else if kind == Kind::Counter && !name.ends_with("_total") {
            Some("is a counter without the _total suffix")
        } else if self.written.contains(name) {
            Some("was written already (a family must be written at once)")
        } else {
            None
        };
        if let Some(why) = broken {
            error!(
                metric = name,
                "metrics: family {name} {why}; its samples are dropped"
            );
        }
        Family {
            enc: self,
            name,
            help,
            kind,
            started: false,
            broken: broken.is_some(),
        }
    }

    /// The exposition text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// One family being written; see [`Encoder::family`].
#[derive(Debug)]
pub struct Family<'a> {
    enc: &'a mut Encoder,
    name: &'a str,
    help: &'a str,
    kind: Kind,
    started: bool,
    broken: bool,
}

impl Family<'_> {
    fn head(&mut self) -> bool {
        if self.broken {
            return false;
        }
        if !self.started {
            self.started = true;
            self.enc.written.insert(self.name.to_owned());
            let out = &mut self.enc.out;
            let _ = writeln!(out, "# HELP {} {}", self.name, escape_help(self.help));
            let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind.as_str());
        }
        true
    }

    fn line(
        &mut self,
        suffix: &str,
        labels: &[(&str, &str)],
        extra: Option<(&str, &str)>,
        v: Value,
    ) {
        let out = &mut self.enc.out;
        out.push_str(self.name);
        out.push_str(suffix);
        let all = labels.iter().copied().chain(extra);
        let mut first = true;
        for (k, val) in all {
            if !valid_label_name(k) {
                error!(
                    metric = self.name,
                    label = k,
                    "metrics: invalid label name; label dropped"
                );
                continue;
            }
            out.push(if first { '{' } else { ',' });
            first = false;
            out.push_str(k);
            out.push_str("=\"");
            out.push_str(&escape_label_value(val));
            out.push('"');
        }
        if !first {
            out.push('}');
        }
        out.push(' ');
        write_value(out, v);
        out.push('\n');
    }

    /// One sample of a counter or gauge.
    pub fn sample(&mut self, labels: &[(&str, &str)], v: impl Into<Value>) {
        if self.kind == Kind::Histogram {
            error!(
                metric = self.name,
                "metrics: a plain sample of a histogram; dropped"
            );
            return;
        }
        if self.head() {
            self.line("", labels, None, v.into());
        }
    }

    /// One histogram: `bounds` ascending, `counts` per bucket (not cumulative) with the
    /// overflow bucket last (`bounds.len() + 1` entries); `_count` is their sum, so the
    /// `+Inf` bucket always equals it.
    pub fn histogram(&mut self, labels: &[(&str, &str)], bounds: &[f64], counts: &[u64], sum: f64) {
        if self.kind != Kind::Histogram || counts.len() != bounds.len() + 1 {
            error!(
                metric = self.name,
                "metrics: a malformed histogram; dropped"
            );
            return;
        }
        if !self.head() {
            return;
        }
        let mut cumulative = 0u64;
        let mut le = String::new();
        for (i, c) in counts.iter().enumerate() {
            cumulative = cumulative.saturating_add(*c);
            le.clear();
            match bounds.get(i) {
                Some(b) => write_float(&mut le, *b),
                None => le.push_str("+Inf"),
            }
            self.line("_bucket", labels, Some(("le", &le)), Value::Int(cumulative));
        }
        self.line("_sum", labels, None, Value::Float(sum));
        self.line("_count", labels, None, Value::Int(cumulative));
    }
}

// ---------------------------------------------------------------------------------------
// API calls.

/// The gRPC status codes, by number (0..=16), as label values.
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];
const CANCELLED: usize = 1;
const UNKNOWN: usize = 2;

/// Upper bounds (seconds) of the call latency histogram: 1 ms to 5 minutes (streams such
/// as logs or events run long).
pub const LATENCY_BUCKETS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// The label value for a call to a method the server does not serve.
pub const UNKNOWN_METHOD: &str = "unknown";

#[derive(Debug)]
struct MethodStats {
    service: String,
    method: String,
    started: AtomicU64,
    handled: [AtomicU64; GRPC_CODES.len()],
    /// Per bucket, not cumulative; the overflow bucket last.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl MethodStats {
    fn new(service: &str, method: &str) -> Self {
        Self {
            service: service.to_owned(),
            method: method.to_owned(),
            started: AtomicU64::new(0),
            handled: [const { AtomicU64::new(0) }; GRPC_CODES.len()],
            buckets: [const { AtomicU64::new(0) }; LATENCY_BUCKETS.len() + 1],
            sum_nanos: AtomicU64::new(0),
        }
    }
}

/// Counters and latencies of API calls, per method the server knows (fixed at start) and
/// one `unknown` for anything else: the label set is bounded whatever clients send.
#[derive(Debug)]
pub struct GrpcMetrics {
    index: HashMap<String, usize>,
    /// The known methods, then `unknown` last.
    methods: Vec<MethodStats>,
}

impl GrpcMetrics {
    /// For the methods `known` (`package.Service/Method`, as [`crate::api::served_methods`]
    /// gives them).
    pub fn new<'a>(known: impl IntoIterator<Item = &'a str>) -> Self {
        let mut index = HashMap::new();
        let mut methods = Vec::new();
        for m in known {
            let Some((service, method)) = m.split_once('/') else {
                continue;
            };
            if index.contains_key(m) {
                continue;
            }
            index.insert(m.to_owned(), methods.len());
            methods.push(MethodStats::new(service, method));
        }
        methods.push(MethodStats::new(UNKNOWN_METHOD, UNKNOWN_METHOD));
        Self { index, methods }
    }

    fn lookup(&self, path: &str) -> usize {
        self.index
            .get(path.trim_start_matches('/'))
            .copied()
            .unwrap_or(self.methods.len().saturating_sub(1))
    }

    fn start(self: &Arc<Self>, path: &str) -> Call {
        let idx = self.lookup(path);
        if let Some(m) = self.methods.get(idx) {
            m.started.fetch_add(1, Ordering::Relaxed);
        }
        Call {
            metrics: self.clone(),
            idx,
            start: Instant::now(),
            done: false,
        }
    }

    fn observe(&self, idx: usize, code: usize, took: Duration) {
        let Some(m) = self.methods.get(idx) else {
            return;
        };
        if let Some(c) = m.handled.get(code.min(GRPC_CODES.len() - 1)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let secs = took.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        if let Some(b) = m.buckets.get(bucket) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        m.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn encode(&self, enc: &mut Encoder) {
        let mut f = enc.family(
            "aurae_grpc_server_started_total",
            "API calls started, by method (grpc_service=\"unknown\": a method auraed does not serve).",
            Kind::Counter,
        );
        for m in &self.methods {
            let n = m.started.load(Ordering::Relaxed);
            if n > 0 {
                f.sample(
                    &[("grpc_service", &m.service), ("grpc_method", &m.method)],
                    n,
                );
            }
        }
        let mut f = enc.family(
            "aurae_grpc_server_handled_total",
            "API calls completed, by method and gRPC status code (refused calls included).",
            Kind::Counter,
        );
        for m in &self.methods {
            for (code, c) in GRPC_CODES.iter().zip(&m.handled) {
                let n = c.load(Ordering::Relaxed);
                if n > 0 {
                    f.sample(
                        &[
                            ("grpc_service", &m.service),
                            ("grpc_method", &m.method),
                            ("grpc_code", code),
                        ],
                        n,
                    );
                }
            }
        }
        let mut f = enc.family(
            "aurae_grpc_server_handling_seconds",
            "Time from a call's arrival to its status (a stream: to its end), by method.",
            Kind::Histogram,
        );
        for m in &self.methods {
            let counts: Vec<u64> = m
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect();
            if counts.iter().all(|c| *c == 0) {
                continue;
            }
            let sum = m.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
            f.histogram(
                &[("grpc_service", &m.service), ("grpc_method", &m.method)],
                &LATENCY_BUCKETS,
                &counts,
                sum,
            );
        }
    }
}

/// One call being observed: recorded once, with its status code; a call dropped before
/// its status (the client went away, the server's timeout) counts as CANCELLED.
#[derive(Debug)]
struct Call {
    metrics: Arc<GrpcMetrics>,
    idx: usize,
    start: Instant,
    done: bool,
}

impl Call {
    fn finish(&mut self, code: usize) {
        if !self.done {
            self.done = true;
            self.metrics.observe(self.idx, code, self.start.elapsed());
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(CANCELLED);
    }
}

/// The code in a `grpc-status` header or trailer (anything unparsable: UNKNOWN).
fn grpc_status(h: &http::HeaderMap) -> Option<usize> {
    let v = h.get("grpc-status")?;
    Some(
        v.to_str()
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|c| *c < GRPC_CODES.len())
            .unwrap_or(UNKNOWN),
    )
}

/// The tower layer that observes every call; put it outside the authorization layer so
/// refused calls count too.
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<GrpcMetrics>,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: Arc<GrpcMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<GrpcMetrics>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let mut call = self.metrics.start(req.uri().path());
        // The service that was polled ready is the one that must be called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            match inner.call(req).await {
                Ok(resp) => {
                    // Trailers-only (every error tonic answers, refusals included).
                    if let Some(code) = grpc_status(resp.headers()) {
                        call.finish(code);
                        return Ok(resp);
                    }
                    if resp.body().is_end_stream() {
                        call.finish(UNKNOWN);
                        return Ok(resp);
                    }
                    Ok(resp.map(|body| {
                        tonic::body::Body::new(ObservedBody {
                            inner: body,
                            call: Some(call),
                        })
                    }))
                }
                Err(e) => {
                    call.finish(UNKNOWN);
                    Err(e)
                }
            }
        })
    }
}

/// A response body that records its call when the status trailer passes (or the body
/// ends or is dropped without one).
struct ObservedBody {
    inner: tonic::body::Body,
    call: Option<Call>,
}

impl hyper::body::Body for ObservedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status)
                    && let Some(mut c) = this.call.take()
                {
                    c.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => {
                if let Some(mut c) = this.call.take() {
                    c.finish(UNKNOWN);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// ---------------------------------------------------------------------------------------
// What a scrape reads.

/// Everything a scrape reads.
#[derive(Debug)]
pub struct Sources {
    pub cells: Arc<Cells>,
    pub vms: Arc<Vms>,
    pub instances: Arc<Instances>,
    pub pods: Arc<Pods>,
    pub grpc: Arc<GrpcMetrics>,
    pub started_at: SystemTime,
}

const PHASES: [Phase; 5] = [
    Phase::Starting,
    Phase::Running,
    Phase::Stopping,
    Phase::Exited,
    Phase::Failed,
];

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Starting => "starting",
        Phase::Running => "running",
        Phase::Stopping => "stopping",
        Phase::Exited => "exited",
        Phase::Failed => "failed",
    }
}

fn usec(u: u64) -> f64 {
    u as f64 / 1e6
}

/// One count per phase, every phase present (0 included).
fn phase_counts(enc: &mut Encoder, name: &str, help: &str, phases: &[Phase]) {
    let mut f = enc.family(name, help, Kind::Gauge);
    for p in PHASES {
        let n = phases.iter().filter(|q| **q == p).count() as u64;
        f.sample(&[("phase", phase_name(p))], n);
    }
}

/// `<name>{<label>=…,phase=…}` 1 for the current phase, 0 for the others.
fn phase_states<'a>(
    enc: &mut Encoder,
    name: &str,
    help: &str,
    rows: impl Iterator<Item = (Vec<(&'a str, &'a str)>, Phase)>,
) {
    let mut f = enc.family(name, help, Kind::Gauge);
    for (labels, phase) in rows {
        for p in PHASES {
            let mut l = labels.clone();
            l.push(("phase", phase_name(p)));
            f.sample(&l, u64::from(p == phase));
        }
    }
}

struct CellRow {
    name: String,
    phase: Phase,
    stats: Option<CellStats>,
    memory_max: Option<u64>,
    pids_max: Option<u64>,
}

struct ExeRow {
    cell: String,
    name: String,
    phase: Phase,
    stats: Option<aurae_proto::runtime::v0::ResourceStats>,
}

struct VmRow {
    name: String,
    phase: Phase,
    vcpus: u64,
    memory_bytes: u64,
    usage: Option<VmmUsage>,
    /// Port-I/O and MMIO exits, as the VMM last reported them.
    exits: Option<crate::vm::VmExits>,
}

struct VmmUsage {
    cpu_usec: u64,
    rss_bytes: u64,
    /// (vCPU index, CPU microseconds of its thread).
    vcpus: Vec<(String, u64)>,
}

/// A cgroup of an instance or pod: its name, phase and usage here.
struct GroupRow {
    name: String,
    phase: Phase,
    isolation: Option<&'static str>,
    stats: Option<CellStats>,
    memory_max: Option<u64>,
}

/// The VMM process's usage from /proc: the whole process and each `vcpuN` thread; `None`
/// when it is gone (or its pid is no longer its own by the time the reads are done).
fn vmm_usage(pid: i32, pidfd: &aurae_sys::Pidfd) -> Option<VmmUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let whole = crate::api::executable::proc_stats(&stat, &status);
    let mut vcpus = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let Some(id) = comm.trim().strip_prefix("vcpu") else {
            continue;
        };
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let tstat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let s = crate::api::executable::proc_stats(&tstat, "");
        vcpus.push((id.to_owned(), s.cpu_usage_usec));
    }
    pidfd.send_signal(0).ok()?;
    vcpus.sort_by_key(|(id, _)| id.parse::<u32>().unwrap_or(u32::MAX));
    Some(VmmUsage {
        cpu_usec: whole.cpu_usage_usec,
        rss_bytes: whole.memory_current_bytes,
        vcpus,
    })
}

/// The numbers of `/proc/self`: (CPU seconds, resident bytes, open fds, soft fd limit).
fn own_process() -> (f64, u64, Option<u64>, Option<u64>) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let s = crate::api::executable::proc_stats(&stat, &status);
    let fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64);
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find_map(|l| l.strip_prefix("Max open files"))?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        });
    (usec(s.cpu_usage_usec), s.memory_current_bytes, fds, max_fds)
}

/// One scrape's text (blocking: reads cgroup and /proc files).
pub fn collect(s: &Sources) -> String {
    let started = Instant::now();
    let mut enc = Encoder::new();
    let controllers = s.cells.controllers();
    let has = |c: &str| controllers.iter().any(|x| x == c);

    // Cells and their executables.
    let mut cells = Vec::new();
    let mut exes = Vec::new();
    for c in s.cells.list(|_| true) {
        let (phase, _) = c.phase_and_message();
        let name = c.spec.name.to_string();
        for e in c.executables() {
            let phase = e.state.borrow().phase;
            let stats = (!e.exited()).then(|| crate::api::executable::process_stats(&e));
            exes.push(ExeRow {
                cell: name.clone(),
                name: e.name.to_string(),
                phase,
                stats,
            });
        }
        cells.push(CellRow {
            stats: s.cells.stats(&c.spec.name).ok(),
            memory_max: c.spec.limits.memory_max,
            pids_max: c.spec.limits.pids_max,
            name,
            phase,
        });
    }
    encode_cells(&mut enc, &cells, &has);
    encode_executables(&mut enc, &exes);

    // VMs.
    let vms: Vec<VmRow> = s
        .vms
        .list(|_| true)
        .iter()
        .map(|v| {
            let st = v.state.borrow().clone();
            let usage = if st.process.is_none() {
                vmm_usage(v.pid, &v.pidfd)
            } else {
                None
            };
            VmRow {
                name: v.spec.name.to_string(),
                phase: st.phase,
                vcpus: u64::from(v.spec.vcpus),
                memory_bytes: v.spec.memory_bytes,
                usage,
                exits: st.exits,
            }
        })
        .collect();
    encode_vms(&mut enc, &vms);

    // Instances and pods: their cgroup here.
    let instances: Vec<GroupRow> = s
        .instances
        .list(|_| true)
        .iter()
        .map(|i| {
            let (stats, memory_max) = s
                .instances
                .host_stats(i)
                .map_or((None, None), |(st, m)| (Some(st), m));
            GroupRow {
                name: i.spec.name.to_string(),
                phase: i.phase(),
                isolation: Some(match i.isolation {
                    Isolation::VirtualMachine => "vm",
                    Isolation::Cell => "cell",
                }),
                stats,
                memory_max,
            }
        })
        .collect();
    let pods: Vec<GroupRow> = s
        .pods
        .list(|_| true)
        .iter()
        .map(|p| {
            let (stats, memory_max) = s
                .instances
                .host_stats(&p.instance)
                .map_or((None, None), |(st, m)| (Some(st), m));
            GroupRow {
                name: p.name.to_string(),
                phase: p.phase(),
                isolation: None,
                stats,
                memory_max,
            }
        })
        .collect();
    encode_groups(&mut enc, "instance", &instances, has("memory"));
    encode_groups(&mut enc, "pod", &pods, has("memory"));

    // API calls, image pulls, auraed itself.
    s.grpc.encode(&mut enc);
    encode_pulls(&mut enc);
    encode_process(&mut enc, s.started_at);
    enc.family(
        "aurae_metrics_collect_seconds",
        "How long this scrape took to read what it shows (before this line).",
        Kind::Gauge,
    )
    .sample(&[], started.elapsed().as_secs_f64());
    enc.finish()
}

fn encode_cells(enc: &mut Encoder, cells: &[CellRow], has: &dyn Fn(&str) -> bool) {
    phase_counts(
        enc,
        "aurae_cells",
        "Cells by phase.",
        &cells.iter().map(|c| c.phase).collect::<Vec<_>>(),
    );
    phase_states(
        enc,
        "aurae_cell_state",
        "1 for the cell's current phase, 0 for the others.",
        cells
            .iter()
            .map(|c| (vec![("cell", c.name.as_str())], c.phase)),
    );
    type Get = fn(&CellStats) -> Value;
    let mut families: Vec<(&str, &str, Kind, Get)> = vec![
        (
            "aurae_cell_cpu_usage_seconds_total",
            "CPU time of the cell's processes (cpu.stat usage_usec; nested cells included).",
            Kind::Counter,
            |s| Value::Float(usec(s.cpu_usage_usec)),
        ),
        (
            "aurae_cell_cpu_user_seconds_total",
            "User CPU time of the cell's processes (cpu.stat user_usec).",
            Kind::Counter,
            |s| Value::Float(usec(s.cpu_user_usec)),
        ),
        (
            "aurae_cell_cpu_system_seconds_total",
            "System CPU time of the cell's processes (cpu.stat system_usec).",
            Kind::Counter,
            |s| Value::Float(usec(s.cpu_system_usec)),
        ),
    ];
    if has("cpu") {
        families.extend([
            (
                "aurae_cell_cpu_cfs_throttled_periods_total",
                "Periods in which cpu.max throttled the cell (cpu.stat nr_throttled).",
                Kind::Counter,
                (|s| Value::Int(s.cpu_nr_throttled)) as Get,
            ),
            (
                "aurae_cell_cpu_cfs_throttled_seconds_total",
                "Time the cell was throttled by cpu.max (cpu.stat throttled_usec).",
                Kind::Counter,
                |s| Value::Float(usec(s.cpu_throttled_usec)),
            ),
        ]);
    }
    if has("memory") {
        families.extend([
            (
                "aurae_cell_memory_usage_bytes",
                "Memory the cell uses now, page cache included (memory.current).",
                Kind::Gauge,
                (|s| Value::Int(s.memory_current_bytes)) as Get,
            ),
            (
                "aurae_cell_memory_max_usage_bytes",
                "Most memory the cell has used (memory.peak).",
                Kind::Gauge,
                |s| Value::Int(s.memory_peak_bytes),
            ),
            (
                "aurae_cell_oom_kills_total",
                "Processes of the cell the OOM killer killed (memory.events oom_kill).",
                Kind::Counter,
                |s| Value::Int(s.oom_kills),
            ),
        ]);
    }
    if has("pids") {
        families.push((
            "aurae_cell_pids",
            "Processes and threads in the cell (pids.current).",
            Kind::Gauge,
            |s| Value::Int(s.pids_current),
        ));
    }
    if has("io") {
        families.extend([
            (
                "aurae_cell_io_read_bytes_total",
                "Bytes the cell read from block devices (io.stat rbytes, all devices).",
                Kind::Counter,
                (|s| Value::Int(s.io_read_bytes)) as Get,
            ),
            (
                "aurae_cell_io_write_bytes_total",
                "Bytes the cell wrote to block devices (io.stat wbytes, all devices).",
                Kind::Counter,
                |s| Value::Int(s.io_write_bytes),
            ),
        ]);
    }
    for (name, help, kind, get) in families {
        let mut f = enc.family(name, help, kind);
        for c in cells {
            if let Some(st) = &c.stats {
                f.sample(&[("cell", &c.name)], get(st));
            }
        }
    }
    let mut f = enc.family(
        "aurae_cell_memory_limit_bytes",
        "The cell's memory.max, where it sets one.",
        Kind::Gauge,
    );
    for c in cells {
        if let Some(m) = c.memory_max {
            f.sample(&[("cell", &c.name)], m);
        }
    }
    let mut f = enc.family(
        "aurae_cell_pids_limit",
        "The cell's pids.max, where it sets one.",
        Kind::Gauge,
    );
    for c in cells {
        if let Some(m) = c.pids_max {
            f.sample(&[("cell", &c.name)], m);
        }
    }
}

fn encode_executables(enc: &mut Encoder, exes: &[ExeRow]) {
    phase_counts(
        enc,
        "aurae_executables",
        "Executables (not yet freed) by phase.",
        &exes.iter().map(|e| e.phase).collect::<Vec<_>>(),
    );
    phase_states(
        enc,
        "aurae_executable_state",
        "1 for the executable's current phase, 0 for the others.",
        exes.iter().map(|e| {
            (
                vec![("cell", e.cell.as_str()), ("executable", e.name.as_str())],
                e.phase,
            )
        }),
    );
    type Get = fn(&aurae_proto::runtime::v0::ResourceStats) -> Value;
    let families: [(&str, &str, Kind, Get); 8] = [
        (
            "aurae_executable_cpu_usage_seconds_total",
            "CPU time of the executable's process (/proc stat utime+stime; 10 ms ticks).",
            Kind::Counter,
            |s| Value::Float(usec(s.cpu_usage_usec)),
        ),
        (
            "aurae_executable_cpu_user_seconds_total",
            "User CPU time of the executable's process.",
            Kind::Counter,
            |s| Value::Float(usec(s.cpu_user_usec)),
        ),
        (
            "aurae_executable_cpu_system_seconds_total",
            "System CPU time of the executable's process.",
            Kind::Counter,
            |s| Value::Float(usec(s.cpu_system_usec)),
        ),
        (
            "aurae_executable_memory_usage_bytes",
            "Resident memory of the executable's process (VmRSS).",
            Kind::Gauge,
            |s| Value::Int(s.memory_current_bytes),
        ),
        (
            "aurae_executable_memory_max_usage_bytes",
            "Most resident memory of the executable's process (VmHWM).",
            Kind::Gauge,
            |s| Value::Int(s.memory_peak_bytes),
        ),
        (
            "aurae_executable_threads",
            "Threads of the executable's process.",
            Kind::Gauge,
            |s| Value::Int(s.pids_current),
        ),
        (
            "aurae_executable_io_read_bytes_total",
            "Bytes the executable's process read from storage (/proc io read_bytes).",
            Kind::Counter,
            |s| Value::Int(s.io_read_bytes),
        ),
        (
            "aurae_executable_io_write_bytes_total",
            "Bytes the executable's process wrote to storage (/proc io write_bytes).",
            Kind::Counter,
            |s| Value::Int(s.io_write_bytes),
        ),
    ];
    for (name, help, kind, get) in families {
        let mut f = enc.family(name, help, kind);
        for e in exes {
            if let Some(st) = &e.stats {
                f.sample(&[("cell", &e.cell), ("executable", &e.name)], get(st));
            }
        }
    }
}

fn encode_vms(enc: &mut Encoder, vms: &[VmRow]) {
    phase_counts(
        enc,
        "aurae_vms",
        "Virtual machines by phase.",
        &vms.iter().map(|v| v.phase).collect::<Vec<_>>(),
    );
    phase_states(
        enc,
        "aurae_vm_state",
        "1 for the VM's current phase, 0 for the others.",
        vms.iter().map(|v| (vec![("vm", v.name.as_str())], v.phase)),
    );
    let mut f = enc.family("aurae_vm_vcpus", "vCPUs the VM was given.", Kind::Gauge);
    for v in vms {
        f.sample(&[("vm", &v.name)], v.vcpus);
    }
    let mut f = enc.family(
        "aurae_vm_memory_configured_bytes",
        "Guest memory the VM was given.",
        Kind::Gauge,
    );
    for v in vms {
        f.sample(&[("vm", &v.name)], v.memory_bytes);
    }
    let mut f = enc.family(
        "aurae_vm_cpu_usage_seconds_total",
        "CPU time of the VM's VMM process, all threads (vCPUs, devices, network).",
        Kind::Counter,
    );
    for v in vms {
        if let Some(u) = &v.usage {
            f.sample(&[("vm", &v.name)], usec(u.cpu_usec));
        }
    }
    let mut f = enc.family(
        "aurae_vm_vcpu_seconds_total",
        "CPU time of one vCPU thread of the VMM (guest time included).",
        Kind::Counter,
    );
    for v in vms {
        for (id, t) in v.usage.iter().flat_map(|u| &u.vcpus) {
            f.sample(&[("vm", &v.name), ("vcpu", id)], usec(*t));
        }
    }
    let mut f = enc.family(
        "aurae_vm_exits_total",
        "Exits from the guest to the VMM it handled, all vCPUs, by kind (io: port I/O, mmio: \
         memory-mapped I/O such as virtio registers); reported by the VMM every second.",
        Kind::Counter,
    );
    for v in vms {
        if let Some(x) = v.exits {
            f.sample(&[("vm", &v.name), ("kind", "io")], x.io);
            f.sample(&[("vm", &v.name), ("kind", "mmio")], x.mmio);
        }
    }
    let mut f = enc.family(
        "aurae_vm_memory_resident_bytes",
        "Resident memory of the VM's VMM process (the guest memory it touched included).",
        Kind::Gauge,
    );
    for v in vms {
        if let Some(u) = &v.usage {
            f.sample(&[("vm", &v.name)], u.rss_bytes);
        }
    }
}

fn encode_groups(enc: &mut Encoder, kind: &str, rows: &[GroupRow], memory: bool) {
    let plural = format!("aurae_{kind}s");
    phase_counts(
        enc,
        &plural,
        &format!("Spawned {kind}s by phase."),
        &rows.iter().map(|r| r.phase).collect::<Vec<_>>(),
    );
    let state = format!("aurae_{kind}_state");
    phase_states(
        enc,
        &state,
        &format!("1 for the {kind}'s current phase, 0 for the others."),
        rows.iter().map(|r| {
            let mut l = vec![(kind, r.name.as_str())];
            if let Some(i) = r.isolation {
                l.push(("isolation", i));
            }
            (l, r.phase)
        }),
    );
    let cpu = format!("aurae_{kind}_cpu_usage_seconds_total");
    let mut f = enc.family(
        &cpu,
        "CPU time of everything in its cgroup here (cpu.stat usage_usec).",
        Kind::Counter,
    );
    for r in rows {
        if let Some(st) = &r.stats {
            f.sample(&[(kind, &r.name)], usec(st.cpu_usage_usec));
        }
    }
    if !memory {
        return;
    }
    let mem = format!("aurae_{kind}_memory_usage_bytes");
    let mut f = enc.family(
        &mem,
        "Memory its cgroup here uses (memory.current).",
        Kind::Gauge,
    );
    for r in rows {
        if let Some(st) = &r.stats {
            f.sample(&[(kind, &r.name)], st.memory_current_bytes);
        }
    }
    let limit = format!("aurae_{kind}_memory_limit_bytes");
    let mut f = enc.family(&limit, "Its cgroup's memory.max here.", Kind::Gauge);
    for r in rows {
        if let Some(m) = r.memory_max {
            f.sample(&[(kind, &r.name)], m);
        }
    }
}

fn encode_pulls(enc: &mut Encoder) {
    let pulls = &crate::image::pull::PULLS;
    let mut f = enc.family(
        "aurae_image_pulls_total",
        "Image pulls by how they ended.",
        Kind::Counter,
    );
    for (result, n) in pulls.results() {
        f.sample(&[("result", result)], n);
    }
    enc.family(
        "aurae_image_pull_bytes_total",
        "Bytes received from registries (manifests, configs, layers; cached blobs are not fetched).",
        Kind::Counter,
    )
    .sample(&[], pulls.bytes());
}

fn encode_process(enc: &mut Encoder, started_at: SystemTime) {
    enc.family(
        "aurae_build_info",
        "auraed's version (always 1).",
        Kind::Gauge,
    )
    .sample(&[("version", env!("CARGO_PKG_VERSION"))], 1u64);
    let (cpu, rss, fds, max_fds) = own_process();
    let start = started_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    enc.family(
        "process_start_time_seconds",
        "When auraed started, seconds since the Unix epoch.",
        Kind::Gauge,
    )
    .sample(&[], start);
    enc.family(
        "process_cpu_seconds_total",
        "CPU time auraed has used (user and system).",
        Kind::Counter,
    )
    .sample(&[], cpu);
    enc.family(
        "process_resident_memory_bytes",
        "auraed's resident memory (VmRSS).",
        Kind::Gauge,
    )
    .sample(&[], rss);
    if let Some(n) = fds {
        enc.family(
            "process_open_fds",
            "File descriptors auraed has open.",
            Kind::Gauge,
        )
        .sample(&[], n);
    }
    if let Some(n) = max_fds {
        enc.family(
            "process_max_fds",
            "auraed's open-file limit (soft RLIMIT_NOFILE).",
            Kind::Gauge,
        )
        .sample(&[], n);
    }
}

// ---------------------------------------------------------------------------------------
// The HTTP side.

struct State {
    sources: Arc<Sources>,
    /// One scrape at a time: held by the collecting thread itself, so a collection that
    /// overran its deadline still keeps the next one waiting.
    one: Arc<Semaphore>,
}

/// Binds `addr` (warning when it is not loopback: the endpoint has no authentication) and
/// serves `GET /metrics` there until the runtime ends.
pub async fn serve(addr: SocketAddr, sources: Sources) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --metrics-listen {addr}"))?;
    let local = listener.local_addr().unwrap_or(addr);
    if !addr.ip().is_loopback() {
        warn!(
            metrics_listen = %addr,
            "--metrics-listen {addr} is not a loopback address: anyone who can reach it reads \
             the names and usage of every cell, VM, instance and pod (the metrics endpoint has \
             no authentication); prefer 127.0.0.1 or a firewall"
        );
    }
    let state = Arc::new(State {
        sources: Arc::new(sources),
        one: Arc::new(Semaphore::new(1)),
    });
    tokio::spawn(accept_loop(listener, state));
    Ok(local)
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: pause instead of spinning; never end the loop.
                debug!("metrics listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!("metrics listener: {MAX_CONNECTIONS} connections open; closing a new one");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, &req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!("metrics connection: {e}"),
                Err(_) => debug!("metrics connection closed after {CONNECTION_LIFETIME:?}"),
            }
        });
    }
}

fn plain(status: http::StatusCode, text: &str) -> http::Response<Full<Bytes>> {
    let mut r = http::Response::new(Full::new(Bytes::from(text.to_owned())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn respond<B>(state: &State, req: &http::Request<B>) -> http::Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return plain(
            http::StatusCode::NOT_FOUND,
            "not found: auraed serves only GET /metrics here\n",
        );
    }
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        let mut r = plain(
            http::StatusCode::METHOD_NOT_ALLOWED,
            "only GET (or HEAD) /metrics\n",
        );
        r.headers_mut().insert(
            http::header::ALLOW,
            http::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    match scrape(state).await {
        Ok(text) => {
            let mut r = http::Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(CONTENT_TYPE),
            );
            r
        }
        Err(why) => {
            warn!("metrics scrape: {why}");
            plain(http::StatusCode::SERVICE_UNAVAILABLE, &format!("{why}\n"))
        }
    }
}

/// One collection on a blocking thread, after the one before it, within the deadline.
async fn scrape(state: &State) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + SCRAPE_TIMEOUT;
    let permit = tokio::time::timeout_at(deadline, state.one.clone().acquire_owned())
        .await
        .map_err(|_| {
            format!("the scrape before this one is still running after {SCRAPE_TIMEOUT:?}")
        })?
        .map_err(|_| "the metrics endpoint is closing".to_owned())?;
    let sources = state.sources.clone();
    let task = tokio::task::spawn_blocking(move || {
        let _one = permit;
        collect(&sources)
    });
    match tokio::time::timeout_at(deadline, task).await {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(e)) => Err(format!("collecting metrics failed: {e}")),
        Err(_) => Err(format!(
            "collecting metrics took longer than {SCRAPE_TIMEOUT:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    /// Checks every line against the 0.0.4 grammar (the subset we write); returns the
    /// families in order.
    fn check(text: &str) -> Vec<String> {
        let mut families: Vec<String> = Vec::new();
        let mut helped = BTreeSet::new();
        let mut typed: HashMap<String, String> = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, _) = rest.split_once(' ').unwrap();
                assert!(valid_metric_name(name), "{line}");
                assert!(helped.insert(name.to_owned()), "HELP twice: {line}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(helped.contains(name), "TYPE before HELP: {line}");
                assert!(
                    typed.insert(name.to_owned(), kind.to_owned()).is_none(),
                    "TYPE twice: {line}"
                );
                families.push(name.to_owned());
                continue;
            }
            assert!(!line.starts_with('#'), "{line}");
            let name_end = line.find(['{', ' ']).unwrap();
            let name = &line[..name_end];
            let fam = families.last().expect("sample before any TYPE");
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| typed.get(*b).is_some_and(|k| k == "histogram"))
                .unwrap_or(name);
            assert_eq!(base, fam, "sample outside its family: {line}");
        }
        families
    }

    #[test]
    fn label_values_escape_backslash_quote_and_newline() {
        assert_eq!(escape_label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label_value("x\ny"), "x\\ny");
        assert_eq!(escape_label_value("web/api-1"), "web/api-1");
        let mut e = Encoder::new();
        e.family("aurae_x", "help with \\ and\nnewline", Kind::Gauge)
            .sample(&[("cell", "a\"b\\c\nd"), ("k", "")], 1u64);
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP aurae_x help with \\\\ and\\nnewline\n# TYPE aurae_x gauge\naurae_x{cell=\"a\\\"b\\\\c\\nd\",k=\"\"} 1\n"
        );
        check(&text);
    }

    #[test]
    fn names_are_checked_and_counters_need_total() {
        assert!(valid_metric_name("aurae_cell_cpu_usage_seconds_total"));
        assert!(valid_metric_name("a:b_c9"));
        assert!(!valid_metric_name("9abc"));
        assert!(!valid_metric_name("a-b"));
        assert!(!valid_metric_name(""));
        assert!(valid_label_name("grpc_code"));
        assert!(!valid_label_name("__name__"));
        assert!(!valid_label_name("a:b"));
        let mut e = Encoder::new();
        e.family("aurae_calls", "no _total", Kind::Counter)
            .sample(&[], 1u64);
        e.family("bad-name", "x", Kind::Gauge).sample(&[], 1u64);
        e.family("aurae_ok_total", "x", Kind::Counter)
            .sample(&[("bad-label", "v"), ("good", "v")], 2u64);
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP aurae_ok_total x\n# TYPE aurae_ok_total counter\naurae_ok_total{good=\"v\"} 2\n"
        );
    }

    #[test]
    fn help_and_type_come_once_per_family_and_empty_families_are_left_out() {
        let mut e = Encoder::new();
        e.family("aurae_empty", "nothing", Kind::Gauge);
        let mut f = e.family("aurae_a", "a", Kind::Gauge);
        f.sample(&[("x", "1")], 1u64);
        f.sample(&[("x", "2")], 2.5);
        // The same family again: dropped, never a second HELP/TYPE.
        e.family("aurae_a", "a", Kind::Gauge)
            .sample(&[("x", "3")], 3u64);
        e.family("aurae_b_total", "b", Kind::Counter)
            .sample(&[], f64::INFINITY);
        let text = e.finish();
        assert_eq!(check(&text), ["aurae_a", "aurae_b_total"]);
        assert_eq!(text.matches("# HELP aurae_a ").count(), 1);
        assert!(!text.contains("x=\"3\""));
        assert!(text.contains("aurae_a{x=\"2\"} 2.5\n"));
        assert!(text.contains("aurae_b_total +Inf\n"));
        assert!(!text.contains("aurae_empty"));
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_inf_equals_count() {
        let mut e = Encoder::new();
        e.family("aurae_h_seconds", "h", Kind::Histogram).histogram(
            &[("m", "x")],
            &[0.001, 0.5, 1.0],
            &[2, 0, 3, 1],
            4.25,
        );
        let text = e.finish();
        check(&text);
        let want = "aurae_h_seconds_bucket{m=\"x\",le=\"0.001\"} 2\n\
                    aurae_h_seconds_bucket{m=\"x\",le=\"0.5\"} 2\n\
                    aurae_h_seconds_bucket{m=\"x\",le=\"1\"} 5\n\
                    aurae_h_seconds_bucket{m=\"x\",le=\"+Inf\"} 6\n\
                    aurae_h_seconds_sum{m=\"x\"} 4.25\n\
                    aurae_h_seconds_count{m=\"x\"} 6\n";
        assert!(text.ends_with(want), "{text}");
        // Malformed: a count per bound without the overflow bucket.
        let mut e = Encoder::new();
        e.family("aurae_h_seconds", "h", Kind::Histogram)
            .histogram(&[], &[1.0], &[1], 1.0);
        assert_eq!(e.finish(), "");
    }

    #[test]
    fn latency_buckets_ascend_from_a_millisecond_to_minutes() {
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(LATENCY_BUCKETS[0], 0.001);
        assert!(*LATENCY_BUCKETS.last().unwrap() >= 60.0);
    }

    #[test]
    fn calls_count_by_known_method_code_and_unknown_ones_share_one_label() {
        let m = Arc::new(GrpcMetrics::new([
            "grpc.health.v1.Health/Check",
            "aurae.runtime.v0.Cells/Allocate",
        ]));
        let mut c = m.start("/grpc.health.v1.Health/Check");
        c.finish(0);
        c.finish(5); // once only
        drop(c);
        m.start("/aurae.runtime.v0.Cells/Allocate").finish(7);
        // Dropped before a status: CANCELLED.
        drop(m.start("/aurae.runtime.v0.Cells/Allocate"));
        for evil in ["/x/\"y\"", "/evil/1", "/evil/2", "/"] {
            m.start(evil).finish(99);
        }
        let mut e = Encoder::new();
        m.encode(&mut e);
        let text = e.finish();
        check(&text);
        let has = |l: &str| text.lines().any(|x| x == l);
        assert!(has(
            "aurae_grpc_server_handled_total{grpc_service=\"grpc.health.v1.Health\",grpc_method=\"Check\",grpc_code=\"OK\"} 1"
        ));
        assert!(has(
            "aurae_grpc_server_handled_total{grpc_service=\"aurae.runtime.v0.Cells\",grpc_method=\"Allocate\",grpc_code=\"PERMISSION_DENIED\"} 1"
        ));
        assert!(has(
            "aurae_grpc_server_handled_total{grpc_service=\"aurae.runtime.v0.Cells\",grpc_method=\"Allocate\",grpc_code=\"CANCELLED\"} 1"
        ));
        assert!(has(
            "aurae_grpc_server_handled_total{grpc_service=\"unknown\",grpc_method=\"unknown\",grpc_code=\"UNAUTHENTICATED\"} 4"
        ));
        assert!(has(
            "aurae_grpc_server_started_total{grpc_service=\"unknown\",grpc_method=\"unknown\"} 4"
        ));
        assert!(has(
            "aurae_grpc_server_handling_seconds_count{grpc_service=\"aurae.runtime.v0.Cells\",grpc_method=\"Allocate\"} 2"
        ));
        assert!(!text.contains("evil"));
    }

    #[test]
    fn grpc_status_reads_the_code_and_bad_values_are_unknown() {
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", http::HeaderValue::from_static("7"));
        assert_eq!(grpc_status(&h), Some(7));
        h.insert("grpc-status", http::HeaderValue::from_static("77"));
        assert_eq!(grpc_status(&h), Some(UNKNOWN));
        h.insert("grpc-status", http::HeaderValue::from_static("x"));
        assert_eq!(grpc_status(&h), Some(UNKNOWN));
    }

    #[test]
    fn io_stat_bytes_sum_over_devices() {
        let io = "8:0 rbytes=1000 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n\
                  259:0 rbytes=24 wbytes=5 rios=3 wios=1 dbytes=0 dios=0\n";
        assert_eq!(crate::cell::registry::io_bytes(io, "rbytes="), 1024);
        assert_eq!(crate::cell::registry::io_bytes(io, "wbytes="), 25);
        assert_eq!(crate::cell::registry::io_bytes("", "rbytes="), 0);
    }

    #[test]
    fn pull_results_are_a_bounded_set_in_the_exposition() {
        let mut e = Encoder::new();
        encode_pulls(&mut e);
        let text = e.finish();
        check(&text);
        for r in crate::image::pull::PULL_RESULTS {
            assert!(text.contains(&format!("aurae_image_pulls_total{{result=\"{r}\"}} ")));
        }
        assert!(text.contains("aurae_image_pull_bytes_total "));
    }

    #[test]
    fn own_process_figures_are_read() {
        let mut e = Encoder::new();
        encode_process(&mut e, SystemTime::now());
        let text = e.finish();
        check(&text);
        assert!(text.contains(&format!(
            "aurae_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
        let rss = text
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .unwrap();
        assert!(rss.parse::<u64>().unwrap() > 0);
        assert!(text.contains("process_open_fds "));
    }
}
