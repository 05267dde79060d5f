//! `--metrics-listen`: a real auraed serves Prometheus text (format 0.0.4) on plain
//! HTTP/1.1. Every line of every scrape goes through a strict parser written here from
//! the format's grammar; API calls are counted exactly (deltas between two scrapes), by
//! method and code, refused ones included; a cell's CPU seconds are real and grow, and the
//! cell is gone from the scrape once freed (host tier); other paths are 404; garbage, a
//! slow client and 1000 connections leave the daemon serving; without the flag nothing
//! listens.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    Daemon, DaemonOptions,
    tier::{self, Tier},
};
use tonic::Code;

// ---------------------------------------------------------------------------------------
// A strict parser of the text exposition format 0.0.4.

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, Default)]
struct Family {
    kind: String,
    samples: Vec<Sample>,
}

#[derive(Debug, Default)]
struct Exposition {
    families: BTreeMap<String, Family>,
}

fn valid_metric_name(n: &str) -> bool {
    let mut b = n.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

fn valid_label_name(n: &str) -> bool {
    let mut b = n.bytes();
    !n.starts_with("__")
        && b.next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// A float as the format spells it (Go's ParseFloat plus `+Inf`, `-Inf`, `NaN`).
fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => {
            let ok = !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b));
            if !ok {
                return Err(format!("value {s:?} is not a number"));
            }
            s.parse::<f64>().map_err(|e| format!("value {s:?}: {e}"))
        }
    }
}

/// `name{l="v",…} value [timestamp]`, escapes in values only `\\`, `\"`, `\n`.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or_else(|| format!("no value: {line:?}"))?;
    let name = &line[..name_end];
    if !valid_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        loop {
            // label name
            let start = chars.peek().map(|(i, _)| *i).ok_or("unterminated labels")?;
            if r[start..].starts_with('}') {
                chars.next();
                break;
            }
            let mut end = start;
            while let Some((i, c)) = chars.peek().copied() {
                if c == '=' {
                    break;
                }
                end = i + c.len_utf8();
                chars.next();
            }
            let lname = &r[start..end];
            if !valid_label_name(lname) {
                return Err(format!("bad label name {lname:?} in {line:?}"));
            }
            if chars.next().map(|(_, c)| c) != Some('=') {
                return Err(format!("no '=' after {lname:?}"));
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {lname:?}: value is not quoted"));
            }
            let mut value = String::new();
            loop {
                match chars.next().map(|(_, c)| c) {
                    None => return Err(format!("unterminated value of {lname:?}")),
                    Some('"') => break,
                    Some('\\') => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => {
                            return Err(format!("bad escape \\{other:?} in {lname:?}"));
                        }
                    },
                    Some(c) => value.push(c),
                }
            }
            if labels.insert(lname.to_owned(), value).is_some() {
                return Err(format!("label {lname:?} twice in {line:?}"));
            }
            match chars.next().map(|(_, c)| c) {
                Some(',') => continue,
                Some('}') => break,
                other => return Err(format!("expected ',' or '}}', got {other:?} in {line:?}")),
            }
        }
        let consumed = chars.peek().map_or(r.len(), |(i, _)| *i);
        rest = &r[consumed..];
    }
    let rest = rest
        .strip_prefix(' ')
        .ok_or_else(|| format!("no space before the value: {line:?}"))?;
    let mut parts = rest.split(' ');
    let value = parse_value(parts.next().unwrap_or_default())?;
    if let Some(ts) = parts.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if parts.next().is_some() {
        return Err(format!("trailing fields: {line:?}"));
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The family a sample name belongs to, given the TYPEs seen.
fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.get(base).is_some_and(|k| k == "histogram")
        {
            return base;
        }
    }
    name
}

/// Parses every line; any deviation from the grammar or the family rules fails.
fn parse(text: &str) -> Result<Exposition, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the text does not end with a newline".into());
    }
    let mut exp = Exposition::default();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut closed = BTreeSet::new();
    let mut series = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.is_empty() {
            return Err(at("empty line".into()));
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut p = rest.trim_start().splitn(3, ' ');
            match (p.next(), p.next(), p.next()) {
                (Some("HELP"), Some(name), text) => {
                    if !valid_metric_name(name) || !helps.insert(name.to_owned()) {
                        return Err(at("bad or repeated HELP".into()));
                    }
                    let t = text.unwrap_or_default();
                    let mut it = t.chars();
                    while let Some(c) = it.next() {
                        if c == '\\' && !matches!(it.next(), Some('\\' | 'n')) {
                            return Err(at("bad escape in HELP".into()));
                        }
                    }
                }
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(at(format!("unknown type {kind:?}")));
                    }
                    if types.insert(name.to_owned(), kind.to_owned()).is_some() {
                        return Err(at("TYPE twice".into()));
                    }
                    if exp.families.contains_key(name) {
                        return Err(at("TYPE after the family's samples".into()));
                    }
                    if let Some(c) = current.replace(name.to_owned()) {
                        closed.insert(c);
                    }
                    exp.families.insert(
                        name.to_owned(),
                        Family {
                            kind: kind.to_owned(),
                            samples: Vec::new(),
                        },
                    );
                }
                _ => return Err(at("a comment that is neither HELP nor TYPE".into())),
            }
            continue;
        }
        let s = parse_sample(line).map_err(at)?;
        let fam = family_of(&s.name, &types).to_owned();
        if closed.contains(&fam) {
            return Err(at(format!("family {fam} is not contiguous")));
        }
        if current.as_deref() != Some(fam.as_str())
            && let Some(c) = current.replace(fam.clone())
        {
            closed.insert(c);
        }
        let f = exp.families.entry(fam.clone()).or_insert_with(|| Family {
            kind: "untyped".into(),
            samples: Vec::new(),
        });
        match f.kind.as_str() {
            "counter"
                if s.name != fam
                    || !fam.ends_with("_total")
                    || s.value.is_nan()
                    || s.value < 0.0 =>
            {
                return Err(at("a counter: name_total, value >= 0".into()));
            }
            "histogram" if s.name.ends_with("_bucket") != s.labels.contains_key("le") => {
                return Err(at("le on a bucket and only there".into()));
            }
            _ => {}
        }
        if s.name.starts_with("aurae_") && s.value.is_nan() {
            return Err(at("NaN".into()));
        }
        if !series.insert(format!("{}{:?}", s.name, s.labels)) {
            return Err(at("the same series twice".into()));
        }
        f.samples.push(s);
    }
    for (name, f) in &exp.families {
        if f.kind == "histogram" {
            check_histogram(name, f)?;
        }
        if f.samples.is_empty() {
            return Err(format!("family {name} has no samples"));
        }
        if !helps.contains(name) {
            return Err(format!("family {name} has no HELP"));
        }
    }
    Ok(exp)
}

/// Per label set: `le` ascending, cumulative counts non-decreasing, `+Inf` = `_count`,
/// a `_sum`.
/// One histogram series: buckets (le, cumulative count), sum, count.
type HistogramSeries = (Vec<(f64, f64)>, Option<f64>, Option<f64>);

fn check_histogram(name: &str, f: &Family) -> Result<(), String> {
    let mut by: BTreeMap<String, HistogramSeries> = BTreeMap::new();
    for s in &f.samples {
        let mut l = s.labels.clone();
        let le = l.remove("le");
        let e = by.entry(format!("{l:?}")).or_default();
        if s.name.ends_with("_bucket") {
            e.0.push((parse_value(&le.unwrap_or_default())?, s.value));
        } else if s.name.ends_with("_sum") {
            e.1 = Some(s.value);
        } else {
            e.2 = Some(s.value);
        }
    }
    for (l, (buckets, sum, count)) in by {
        let count = count.ok_or(format!("{name}{l}: no _count"))?;
        sum.ok_or(format!("{name}{l}: no _sum"))?;
        if !buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
        {
            return Err(format!(
                "{name}{l}: buckets not ascending/cumulative: {buckets:?}"
            ));
        }
        match buckets.last() {
            Some((le, c)) if *le == f64::INFINITY && *c == count => {}
            _ => return Err(format!("{name}{l}: +Inf bucket != _count ({count})")),
        }
    }
    Ok(())
}

impl Exposition {
    fn value(&self, family: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let f = self.families.get(family)?;
        f.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.value(name, name, labels)
    }

    /// Every (labels → value) of a sample name in `family`.
    fn all(&self, family: &str, name: &str) -> BTreeMap<Vec<(String, String)>, f64> {
        self.families
            .get(family)
            .map(|f| {
                f.samples
                    .iter()
                    .filter(|s| s.name == name)
                    .map(|s| (s.labels.clone().into_iter().collect(), s.value))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn mentions(&self, label: &str, value: &str) -> bool {
        self.families.values().any(|f| {
            f.samples
                .iter()
                .any(|s| s.labels.get(label).is_some_and(|v| v == value))
        })
    }
}

// ---------------------------------------------------------------------------------------
// Plain HTTP over a socket.

/// Writes `request`, reads until the server closes; the raw answer.
fn exchange(addr: SocketAddr, request: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(request)?;
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => Ok(out),
        // A reset after the answer (the server closed with our bytes unread).
        Err(e) if !out.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => Ok(out),
        Err(e) => Err(e),
    }
}

struct HttpAnswer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

fn get(addr: SocketAddr, method: &str, path: &str) -> HttpAnswer {
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let raw = exchange(addr, req.as_bytes(), Duration::from_secs(20)).unwrap();
    let text = String::from_utf8(raw).expect("a UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete answer");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
    let status = status_line[9..12].parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .expect("a content-length");
    assert_eq!(body.len(), len, "body length");
    HttpAnswer {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn scrape(addr: SocketAddr) -> (Exposition, Duration) {
    let t = Instant::now();
    let a = get(addr, "GET", "/metrics");
    let took = t.elapsed();
    assert_eq!(a.status, 200, "{}", a.body);
    let ct = a
        .headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str());
    assert_eq!(ct, Some("text/plain; version=0.0.4; charset=utf-8"));
    let exp = parse(&a.body).unwrap_or_else(|e| panic!("{e}\n--- scrape ---\n{}", a.body));
    (exp, took)
}

// ---------------------------------------------------------------------------------------
// The daemon side.

/// The TCP ports `pid` listens on (its socket fds matched against /proc/net/tcp{,6}).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_owned)
        })
        .collect();
    let mut ports = Vec::new();
    for f in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).unwrap_or_default();
        for l in text.lines().skip(1) {
            let cols: Vec<&str> = l.split_whitespace().collect();
            if cols.len() > 9 && cols[3] == "0A" && inodes.contains(cols[9]) {
                let port = cols[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

async fn serving(c: &Client) -> bool {
    c.health()
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status == 1)
}

fn handled(e: &Exposition) -> BTreeMap<Vec<(String, String)>, f64> {
    e.all(
        "aurae_grpc_server_handled_total",
        "aurae_grpc_server_handled_total",
    )
}

fn key(service: &str, method: &str, code: &str) -> Vec<(String, String)> {
    vec![
        ("grpc_code".into(), code.into()),
        ("grpc_method".into(), method.into()),
        ("grpc_service".into(), service.into()),
    ]
}

/// A call to a method auraed does not serve.
async fn call_unknown(c: &Client) -> Code {
    let mut grpc = tonic::client::Grpc::new(c.channel());
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/aurae.runtime.v0.Nope/Nope");
    let codec = tonic_prost::ProstCodec::<pb::NameRef, pb::NameRef>::default();
    grpc.unary(tonic::Request::new(pb::NameRef::default()), path, codec)
        .await
        .map(|_| Code::Ok)
        .unwrap_or_else(|s| s.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_counts_calls_shows_cells_and_survives_abuse() {
    let addr = aurae_testkit::free_port().unwrap();
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            extra_args: vec!["--metrics-listen".into(), addr.to_string()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let admin = d.client("admin").await.unwrap();
    let eve = d.client("eve").await.unwrap(); // no grant in the default policy
    assert!(d.log_text().contains("serving Prometheus metrics"));
    // Only the metrics listener listens on TCP (no --listen).
    assert_eq!(listening_ports(d.pid().unwrap()), [addr.port()]);

    // --- API calls: exact deltas between two scrapes.
    let (before, _) = scrape(addr);
    assert_eq!(
        before.get(
            "aurae_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    for _ in 0..3 {
        assert!(serving(&admin).await);
    }
    for _ in 0..2 {
        let e = eve
            .cells()
            .list(pb::ListRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }
    // Names allow neither quotes nor backslashes: the nastiest input is refused.
    let e = admin
        .cells()
        .allocate(pb::Cell {
            name: "evil\"cell\\x\n".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let unknown_code = call_unknown(&admin).await;
    let (after, _) = scrape(addr);

    let (h0, h1) = (handled(&before), handled(&after));
    let mut deltas = BTreeMap::new();
    for (k, v) in &h1 {
        let d = v - h0.get(k).copied().unwrap_or(0.0);
        if d != 0.0 {
            deltas.insert(k.clone(), d);
        }
    }
    let code_name = |c: Code| match c {
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::PermissionDenied => "PERMISSION_DENIED",
        other => panic!("unexpected code for an unknown method: {other:?}"),
    };
    let want: BTreeMap<_, _> = [
        (key("grpc.health.v1.Health", "Check", "OK"), 3.0),
        (
            key("aurae.runtime.v0.Cells", "List", "PERMISSION_DENIED"),
            2.0,
        ),
        (
            key("aurae.runtime.v0.Cells", "Allocate", "INVALID_ARGUMENT"),
            1.0,
        ),
        (key("unknown", "unknown", code_name(unknown_code)), 1.0),
    ]
    .into_iter()
    .collect();
    assert_eq!(deltas, want, "handled_total deltas");
    // Nothing a client sends becomes a label.
    assert!(!after.mentions("grpc_service", "aurae.runtime.v0.Nope"));
    assert!(!after.mentions("grpc_method", "Nope"));
    let count = |e: &Exposition, svc: &str, m: &str| {
        e.value(
            "aurae_grpc_server_handling_seconds",
            "aurae_grpc_server_handling_seconds_count",
            &[("grpc_service", svc), ("grpc_method", m)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(
        count(&after, "grpc.health.v1.Health", "Check")
            - count(&before, "grpc.health.v1.Health", "Check"),
        3.0
    );
    assert_eq!(
        count(&after, "aurae.runtime.v0.Cells", "List")
            - count(&before, "aurae.runtime.v0.Cells", "List"),
        2.0
    );
    let started = |e: &Exposition| {
        e.get(
            "aurae_grpc_server_started_total",
            &[
                ("grpc_service", "aurae.runtime.v0.Cells"),
                ("grpc_method", "List"),
            ],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(started(&after) - started(&before), 2.0);
    assert!(after.get("process_resident_memory_bytes", &[]).unwrap() > 0.0);
    assert!(after.get("process_open_fds", &[]).unwrap() > 0.0);
    assert!(after.get("process_start_time_seconds", &[]).unwrap() > 1.6e9);
    assert_eq!(
        after.get("aurae_image_pulls_total", &[("result", "success")]),
        Some(0.0)
    );

    // A stream the client walks away from counts as CANCELLED, once.
    let watch = admin
        .events()
        .watch(pb::WatchEventsRequest::default())
        .await
        .unwrap();
    drop(watch);
    let cancelled = key("aurae.runtime.v0.Events", "Watch", "CANCELLED");
    let t = Instant::now();
    loop {
        let (e, _) = scrape(addr);
        let h = handled(&e);
        if let Some(n) = h.get(&cancelled) {
            assert_eq!(*n, 1.0);
            assert_eq!(
                h.keys().filter(|k| k[1].1 == "Watch").count(),
                1,
                "one outcome for the watch: {h:?}"
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the abandoned watch was never counted: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // --- Cells (host tier).
    if tier::check(
        "metrics_endpoint_counts_calls_shows_cells_and_survives_abuse (cells)",
        Tier::Host,
        tier::needs_cells(),
    ) {
        cells_are_shown(&d, &admin, addr).await;
    }

    // --- Paths, methods, garbage, slow clients, floods.
    assert_eq!(get(addr, "GET", "/").status, 404);
    assert_eq!(get(addr, "GET", "/metrics/x").status, 404);
    assert_eq!(get(addr, "GET", "/favicon.ico").status, 404);
    assert_eq!(get(addr, "POST", "/metrics").status, 405);
    let fds_before = d.fd_count().unwrap();
    let garbage: [&[u8]; 5] = [
        b"\x00\xff\xfe garbage \r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        &[b'A'; 70_000],
    ];
    for g in garbage {
        let answer = exchange(addr, g, Duration::from_secs(20)).unwrap_or_default();
        let text = String::from_utf8_lossy(&answer);
        assert!(
            !text.starts_with("HTTP/1.1 200"),
            "garbage got a 200: {:?}",
            &text[..text.len().min(200)]
        );
    }
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 64 * 1024));
    huge.extend(b"\r\n\r\n");
    let answer = exchange(addr, &huge, Duration::from_secs(20)).unwrap_or_default();
    assert!(!String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    // A client that never finishes its request head is closed after the header timeout.
    let t = Instant::now();
    let slow = exchange(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(30),
    );
    let waited = t.elapsed();
    assert!(
        waited < Duration::from_secs(12),
        "a slow client held its connection {waited:?} ({slow:?})"
    );
    assert!(!String::from_utf8_lossy(&slow.unwrap_or_default()).contains(" 200 "));
    // 1000 connections at once: the listener keeps its budget, the daemon serves on.
    raise_fd_limit(4096);
    let flood: Vec<TcpStream> = (0..1000)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok())
        .collect();
    println!("flood: {} connections opened", flood.len());
    assert!(serving(&admin).await, "health during the flood");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = d.fd_count().unwrap();
    drop(flood);
    // Once they are gone, scrapes work again and the daemon's fds come back down.
    let t = Instant::now();
    let req = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    while !exchange(addr, req, Duration::from_secs(20))
        .is_ok_and(|a| a.starts_with(b"HTTP/1.1 200"))
    {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "no scrape after the flood"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    scrape(addr);
    let t = Instant::now();
    while d.fd_count().unwrap() > fds_before + 8 && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fds_after = d.fd_count().unwrap();
    println!(
        "daemon fds: before the abuse {fds_before}, during the flood {during}, after {fds_after}"
    );
    assert!(
        during <= fds_before + 32 + 8,
        "the flood took {during} fds (budget 32)"
    );
    assert!(
        fds_after <= fds_before + 8,
        "fds after the flood: {fds_after}"
    );
    assert!(serving(&admin).await, "health after all the abuse");
    assert!(!serving(&eve).await, "eve still has no grant");
}

fn raise_fd_limit(want: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    let cur = l.current.unwrap_or(u64::MAX);
    if cur < want {
        l.current = Some(l.maximum.map_or(want, |m| m.min(want)));
        let _ = setrlimit(Resource::Nofile, l);
    }
}

/// As root: a cell burning CPU shows real, growing CPU seconds (cpu.stat works without
/// controllers), its nested cell's full name, and nothing once freed; 50 cells scrape in
/// a measured time.
async fn cells_are_shown(d: &Daemon, c: &Client, addr: SocketAddr) {
    // The nastiest name cells allow: a nested path with a 63-character label of '-'s.
    let nested = format!("burn/{}", "z-9".repeat(21));
    for name in ["burn", nested.as_str()] {
        c.cells()
            .allocate(pb::Cell {
                name: name.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("allocate {name}: {e:?}"));
    }
    c.runtime()
        .run_executable(pb::Executable {
            cell: "burn".into(),
            name: "spin".into(),
            argv: vec!["/bin/sh".into(), "-c".into(), "while :; do :; done".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let cpu = |e: &Exposition| e.get("aurae_cell_cpu_usage_seconds_total", &[("cell", "burn")]);
    let t = Instant::now();
    let first = loop {
        let (e, _) = scrape(addr);
        if let Some(v) = cpu(&e)
            && v > 0.05
        {
            break e;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no CPU seconds for burn"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        first.get(
            "aurae_cell_state",
            &[("cell", "burn"), ("phase", "running")]
        ),
        Some(1.0)
    );
    assert_eq!(
        first.get("aurae_cell_state", &[("cell", "burn"), ("phase", "failed")]),
        Some(0.0)
    );
    assert_eq!(
        first.get(
            "aurae_executable_state",
            &[
                ("cell", "burn"),
                ("executable", "spin"),
                ("phase", "running")
            ]
        ),
        Some(1.0)
    );
    // The nested cell under its full name; its parent's figures include it.
    assert!(first.mentions("cell", &nested), "{nested} not shown");
    assert!(
        first
            .get("aurae_cell_cpu_usage_seconds_total", &[("cell", &nested)])
            .is_some()
    );
    let user = first
        .get("aurae_cell_cpu_user_seconds_total", &[("cell", "burn")])
        .unwrap();
    let sys = first
        .get("aurae_cell_cpu_system_seconds_total", &[("cell", "burn")])
        .unwrap();
    assert!(user + sys > 0.0);
    assert!(first.get("aurae_cells", &[("phase", "running")]).unwrap() >= 2.0);
    // Controllers this host does not give cells: their families are absent, not 0.
    for (controller, family) in [
        ("memory", "aurae_cell_memory_usage_bytes"),
        ("pids", "aurae_cell_pids"),
        ("io", "aurae_cell_io_read_bytes_total"),
    ] {
        let absent = tier::needs_controller(controller).is_some();
        assert_eq!(
            first.families.contains_key(family),
            !absent,
            "{family} with the {controller} controller {}",
            if absent { "absent" } else { "present" }
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (second, _) = scrape(addr);
    let (a, b) = (cpu(&first).unwrap(), cpu(&second).unwrap());
    println!("burn: {a:.3} s then {b:.3} s of CPU");
    assert!(b > a + 0.1, "CPU seconds did not grow: {a} -> {b}");
    let exe_cpu = second
        .get(
            "aurae_executable_cpu_usage_seconds_total",
            &[("cell", "burn"), ("executable", "spin")],
        )
        .unwrap();
    assert!(exe_cpu > 0.0, "the executable's own CPU seconds");

    // 50 cells: how long a scrape takes (reported, not asserted).
    let names: Vec<String> = (0..50).map(|i| format!("n-{i}")).collect();
    for n in &names {
        c.cells()
            .allocate(pb::Cell {
                name: n.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut times = Vec::new();
    let mut collect = Vec::new();
    for _ in 0..10 {
        let (e, took) = scrape(addr);
        assert!(e.mentions("cell", "n-49"));
        times.push(took);
        collect.push(e.get("aurae_metrics_collect_seconds", &[]).unwrap());
    }
    times.sort();
    collect.sort_by(f64::total_cmp);
    println!(
        "scrape with {} cells: median {:?} (min {:?}, max {:?}) end to end; collection median {:.2} ms",
        names.len() + 2,
        times[times.len() / 2],
        times[0],
        times[times.len() - 1],
        collect[collect.len() / 2] * 1e3
    );
    for n in &names {
        c.cells()
            .free(pb::NameRef { name: n.clone() })
            .await
            .unwrap();
    }

    // Freed: gone from the scrape.
    c.cells()
        .free(pb::NameRef {
            name: "burn".into(),
        })
        .await
        .unwrap();
    let (gone, _) = scrape(addr);
    for name in ["burn", nested.as_str(), "n-0"] {
        assert!(
            !gone.mentions("cell", name),
            "{name} still in the scrape after Free"
        );
    }
    let _ = d;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_flag_nothing_listens() {
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions::default(),
    )
    .await
    .unwrap();
    let ports = listening_ports(d.pid().unwrap());
    assert!(ports.is_empty(), "auraed listens on TCP ports {ports:?}");
    assert!(!d.log_text().contains("serving Prometheus metrics"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_address_warns_that_the_endpoint_has_no_authentication() {
    // 0.0.0.0 on a free port: reachable from everywhere, so auraed says so.
    let port = aurae_testkit::free_port().unwrap().port();
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            extra_args: vec!["--metrics-listen".into(), format!("0.0.0.0:{port}")],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let log = d.log_text();
    assert!(
        log.contains("is not a loopback address") && log.contains("no authentication"),
        "{log}"
    );
    let (e, _) = scrape(SocketAddr::from(([127, 0, 0, 1], port)));
    assert!(e.families.contains_key("aurae_build_info"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_in_use_stops_auraed_with_the_flag_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            extra_args: vec!["--metrics-listen".into(), addr.to_string()],
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains(&format!("binding --metrics-listen {addr}")),
        "{text}"
    );
}

#[test]
fn the_parser_refuses_what_the_format_does_not_allow() {
    let ok = "# HELP a_total x\n# TYPE a_total counter\na_total{l=\"v\\\"\\\\\\n\"} 1\n";
    let e = parse(ok).unwrap();
    assert_eq!(e.get("a_total", &[("l", "v\"\\\n")]), Some(1.0));
    let head = "# HELP a x\n# TYPE a gauge\n";
    assert!(parse(&format!("{head}a{{l=\"x\"}} 1 1700000000000\na 2.5e3\n")).is_ok());
    for bad in [
        "a 1",                                                  // no final newline
        "a{l=\"x\\t\"} 1\n",                                    // bad escape
        "a{l=x} 1\n",                                           // unquoted
        "a{1l=\"x\"} 1\n",                                      // bad label name
        "a{__l=\"x\"} 1\n",                                     // reserved label name
        "a{l=\"x\",l=\"y\"} 1\n",                               // repeated label
        "a{l=\"x\"\n",                                          // unterminated
        "a one\n",                                              // bad value
        "a 1 2 3\n",                                            // trailing fields
        "a  1\n",                                               // two spaces
        "\n",                                                   // empty line
        "a 1\na 2\n",                                           // the same series twice
        "# TYPE a gauge\na 1\n",                                // TYPE twice
        "a 1\n# HELP b x\n# TYPE b gauge\nb 1\na{x=\"1\"} 2\n", // not contiguous
        "# just a comment\na 1\n", // a comment that is neither HELP nor TYPE
    ] {
        let text = format!("{head}{bad}");
        assert!(parse(&text).is_err(), "accepted: {text:?}");
    }
    for bad in [
        "# HELP c x\n# TYPE c counter\nc 1\n", // a counter without _total
        "# HELP c_total x\n# TYPE c_total counter\nc_total -1\n",
        "# HELP a x\na 1\n# TYPE a gauge\n", // TYPE after samples
        "a 1\n",                             // no HELP
        "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",
        "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_sum 1\nh_count 2\n",
        "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 2\n",
    ] {
        assert!(parse(bad).is_err(), "accepted: {bad:?}");
    }
}

/// Writes the boot-timer port, then spins on `out 0x80` (a VM exit each time).
#[rustfmt::skip]
const SPIN: [u8; 11] = [
    0x66, 0xba, 0x40, 0x04,       // mov dx, 0x440 (boot timer)
    0xb0, 123,                    // mov al, 123
    0xee,                         // out dx, al
    0xe6, 0x80,                   // spin: out 0x80, al
    0xeb, 0xfc,                   //       jmp spin
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_shows_its_vcpu_time_memory_and_exits_and_goes_when_freed() {
    let test = "a_vm_shows_its_vcpu_time_memory_and_exits_and_goes_when_freed";
    if !tier::check(
        test,
        Tier::Host,
        tier::needs_cells().or_else(aurae_testkit::vm::needs_kvm),
    ) {
        return;
    }
    let images = tempfile::tempdir().unwrap();
    let kernel = images.path().join("spin");
    std::fs::write(&kernel, aurae_testkit::vm::tiny_elf(0x20_0000, &SPIN)).unwrap();
    let addr = aurae_testkit::free_port().unwrap();
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            extra_args: vec![
                "--metrics-listen".into(),
                addr.to_string(),
                "--vm-image-root".into(),
                images.path().to_string_lossy().into(),
            ],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let c = d.client("admin").await.unwrap();
    c.runtime()
        .run_virtual_machine(pb::VirtualMachine {
            name: "spinner".into(),
            kernel_path: kernel.to_string_lossy().into(),
            cmdline: "console=ttyS0".into(),
            vcpus: 1,
            memory_bytes: 64 << 20,
            ..Default::default()
        })
        .await
        .unwrap();
    let vm = [("vm", "spinner")];
    let vcpu = [("vm", "spinner"), ("vcpu", "0")];
    let t = Instant::now();
    let first = loop {
        let (e, _) = scrape(addr);
        if e.get("aurae_vm_vcpu_seconds_total", &vcpu)
            .is_some_and(|v| v > 0.0)
        {
            break e;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "no vCPU time");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        first.get("aurae_vm_state", &[("vm", "spinner"), ("phase", "running")]),
        Some(1.0)
    );
    assert_eq!(first.get("aurae_vms", &[("phase", "running")]), Some(1.0));
    assert_eq!(first.get("aurae_vm_vcpus", &vm), Some(1.0));
    assert_eq!(
        first.get("aurae_vm_memory_configured_bytes", &vm),
        Some((64u64 << 20) as f64)
    );
    assert!(first.get("aurae_vm_memory_resident_bytes", &vm).unwrap() > 0.0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (second, _) = scrape(addr);
    let (a, b) = (
        first.get("aurae_vm_vcpu_seconds_total", &vcpu).unwrap(),
        second.get("aurae_vm_vcpu_seconds_total", &vcpu).unwrap(),
    );
    let whole = second.get("aurae_vm_cpu_usage_seconds_total", &vm).unwrap();
    println!("vcpu0: {a:.2} s then {b:.2} s; the VMM process {whole:.2} s");
    assert!(b > a, "vCPU time did not grow: {a} -> {b}");
    assert!(
        whole >= b,
        "the VMM's CPU ({whole}) includes its vCPU's ({b})"
    );
    // The guest spins on `out 0x80`: port-I/O exits, reported by the VMM every second.
    let io = [("vm", "spinner"), ("kind", "io")];
    let t = Instant::now();
    let before = loop {
        let (e, _) = scrape(addr);
        if let Some(n) = e.get("aurae_vm_exits_total", &io).filter(|n| *n > 0.0) {
            assert!(
                e.get(
                    "aurae_vm_exits_total",
                    &[("vm", "spinner"), ("kind", "mmio")]
                )
                .is_some(),
                "mmio exits are reported beside io"
            );
            break n;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no VM exits reported"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (later, _) = scrape(addr);
    let after = later.get("aurae_vm_exits_total", &io).unwrap();
    println!("io exits: {before} then {after}");
    assert!(after > before, "io exits did not grow: {before} -> {after}");
    c.virtual_machines()
        .free(pb::NameRef {
            name: "spinner".into(),
        })
        .await
        .unwrap();
    let (gone, _) = scrape(addr);
    assert!(
        !gone.mentions("vm", "spinner"),
        "the VM is still shown after Free"
    );
}
