//! One module per noun of the API, each with its arguments next to what it calls, plus the
//! small helpers they share: request pieces, value formatting and log streaming.

pub mod attach;
pub mod cell;
pub mod container;
pub mod daemon;
pub mod events;
pub mod exec;
pub mod executable;
pub mod image;
pub mod instance;
mod lifecycle;
pub mod pki;
pub mod pod;
pub mod top;
pub mod vm;

use std::collections::HashMap;

use anyhow::anyhow;
use aurae_proto::runtime::v0 as pb;
use serde_json::{Value, json};
use tonic::Status;

use crate::output::Row;

/// A request `aer` could not even build: INVALID_ARGUMENT, as auraed would answer it.
pub fn invalid(e: anyhow::Error) -> Status {
    Status::invalid_argument(e.to_string())
}

/// `--env KEY=VALUE` flags as a map (nothing is inherited).
pub fn env_pairs(v: &[String]) -> anyhow::Result<HashMap<String, String>> {
    v.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| anyhow!("--env {kv:?}: write KEY=VALUE"))
        })
        .collect()
}

pub fn name(n: &str) -> pb::NameRef {
    pb::NameRef { name: n.to_owned() }
}

/// A timestamp in RFC 3339 (UTC, milliseconds); tables show it relative to now (fields
/// named `at` or `…_at`, see [`crate::output`]).
pub fn ts(t: Option<&prost_types::Timestamp>) -> Value {
    t.map_or(Value::Null, |t| {
        json!(crate::time::rfc3339(t.seconds, t.nanos))
    })
}

/// A duration as `seconds.millis` followed by `s`.
pub fn dur(d: Option<&prost_types::Duration>) -> Value {
    d.map_or(Value::Null, |d| {
        json!(format!("{}.{:03}s", d.seconds, d.nanos / 1_000_000))
    })
}

/// A phase as a word: `running`, `exited`, `unknown(99)`.
pub fn phase_name(p: i32) -> String {
    pb::Phase::try_from(p).map_or_else(
        |_| format!("unknown({p})"),
        |p| p.as_str_name().trim_start_matches("PHASE_").to_lowercase(),
    )
}

pub fn phase(p: i32) -> Value {
    json!(phase_name(p))
}

/// An exit status as `code N` or `signal N`, with ` (OOM)` when the OOM killer did it.
pub fn exit(e: Option<&pb::ExitStatus>) -> Value {
    let Some(e) = e else { return Value::Null };
    let how = match &e.how {
        Some(pb::exit_status::How::Code(c)) => format!("code {c}"),
        Some(pb::exit_status::How::Signal(s)) => format!("signal {s}"),
        None => return Value::Null,
    };
    json!(if e.oom_killed {
        format!("{how} (OOM)")
    } else {
        how
    })
}

/// Bytes for people: `-` for none, else B, K, M or G with one decimal.
pub fn size(b: Option<u64>) -> String {
    match b {
        None => "-".into(),
        Some(b) if b >= 1 << 30 => format!("{:.1}G", b as f64 / f64::from(1u32 << 30)),
        Some(b) if b >= 1 << 20 => format!("{:.1}M", b as f64 / f64::from(1u32 << 20)),
        Some(b) if b >= 1 << 10 => format!("{:.1}K", b as f64 / 1024.0),
        Some(b) => format!("{b}"),
    }
}

pub fn stats_row(s: &pb::ResourceStats) -> Row {
    vec![
        ("cpu_usage_usec", json!(s.cpu_usage_usec)),
        ("cpu_throttled_usec", json!(s.cpu_throttled_usec)),
        ("memory_current", json!(s.memory_current_bytes)),
        ("memory_peak", json!(s.memory_peak_bytes)),
        ("pids_current", json!(s.pids_current)),
        ("oom_kills", json!(s.oom_kills)),
    ]
}

/// A Logs or Console request for NAME: everything kept, then more while `follow`.
pub fn logs_from_start(name: String, follow: bool) -> pb::LogsRequest {
    pb::LogsRequest {
        name,
        follow,
        from_offset: 0,
    }
}

/// Copies a log stream (an executable's, a pod's, a VM's console) to stdout and stderr.
pub async fn stream_logs(mut s: tonic::Streaming<pb::LogChunk>) -> Result<(), Status> {
    use std::io::Write;
    while let Some(chunk) = s.message().await? {
        let mut out: Box<dyn Write> = if chunk.stream == pb::LogStream::Stderr as i32 {
            Box::new(std::io::stderr())
        } else {
            Box::new(std::io::stdout())
        };
        let _ = out.write_all(&chunk.data);
        let _ = out.flush();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_pairs_need_an_equals_sign() {
        let m = env_pairs(&["A=1".into(), "B=x=y".into(), "C=".into()]).unwrap();
        assert_eq!(m["A"], "1");
        assert_eq!(m["B"], "x=y");
        assert_eq!(m["C"], "");
        let e = env_pairs(&["AB".into()]).unwrap_err().to_string();
        assert_eq!(e, r#"--env "AB": write KEY=VALUE"#);
    }

    #[test]
    fn values_read_as_before() {
        let t = prost_types::Timestamp {
            seconds: 12,
            nanos: 5_000_000,
        };
        assert_eq!(ts(Some(&t)), json!("1970-01-01T00:00:12.005Z"));
        assert_eq!(ts(None), Value::Null);
        let d = prost_types::Duration {
            seconds: 1,
            nanos: 234_000_000,
        };
        assert_eq!(dur(Some(&d)), json!("1.234s"));
        assert_eq!(dur(None), Value::Null);
        assert_eq!(phase(pb::Phase::Running as i32), json!("running"));
        assert_eq!(phase(999), json!("unknown(999)"));
        assert_eq!(size(None), "-");
        assert_eq!(size(Some(512)), "512");
        assert_eq!(size(Some(1536)), "1.5K");
        assert_eq!(size(Some(64 << 20)), "64.0M");
        assert_eq!(size(Some(3 << 30)), "3.0G");
    }

    #[test]
    fn exits_name_code_signal_and_oom() {
        let st = |how, oom_killed| pb::ExitStatus {
            how: Some(how),
            oom_killed,
            ..Default::default()
        };
        let code = st(pb::exit_status::How::Code(3), false);
        let killed = st(pb::exit_status::How::Signal(9), true);
        assert_eq!(exit(Some(&code)), json!("code 3"));
        assert_eq!(exit(Some(&killed)), json!("signal 9 (OOM)"));
        assert_eq!(exit(Some(&pb::ExitStatus::default())), Value::Null);
        assert_eq!(exit(None), Value::Null);
    }
}
