//! What several adapters use: the response stream type, the authorized name, durations,
//! the listing filter and log streaming.

use std::{pin::Pin, sync::Arc, time::Duration};

use aurae_proto::runtime::v0 as pb;
use tokio_stream::Stream;
use tonic::{Request, Status};

use super::{authz::Caller, status::invalid};
use crate::{
    spec::{DEFAULT_GRACE, FieldError, MAX_GRACE, duration, name_prefix},
    workload::log::Log,
};

pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The caller, and the parsed name once the grant covers its `resource`.
pub(super) fn authorized<T, N>(
    r: &Request<T>,
    parsed: Result<N, FieldError>,
    resource: impl FnOnce(&N) -> &str,
) -> Result<(Caller, N), Status> {
    let caller = Caller::of(r)?;
    let name = parsed.map_err(invalid)?;
    caller.authorize_name(resource(&name))?;
    Ok((caller, name))
}

/// Which names a list shows: those under the request's prefix that the grant covers.
pub(super) fn visible<T>(
    r: &Request<T>,
    field: &str,
    prefix: &str,
) -> Result<impl Fn(&str) -> bool + use<T>, Status> {
    let caller = Caller::of(r)?;
    let prefix = name_prefix(field, prefix).map_err(invalid)?;
    Ok(move |n: &str| n.starts_with(&prefix) && caller.grant.allows_name(n))
}

/// A grace period (or any bounded wait): the default when absent.
pub(super) fn grace(
    field: &str,
    d: Option<&prost_types::Duration>,
) -> Result<Duration, FieldError> {
    duration(field, d, DEFAULT_GRACE, MAX_GRACE)
}

/// The `run` options of RunExecutable and RunCell: `timeout` and `output` only with
/// `wait`; a timeout of at most 10 minutes.
pub(super) fn run_options(
    r: Option<&pb::RunOptions>,
) -> Result<crate::compose::run_to_end::RunOptions, FieldError> {
    let Some(r) = r else {
        return Ok(Default::default());
    };
    for (field, given) in [
        ("run.timeout", r.timeout.is_some()),
        ("run.output", r.output),
    ] {
        if given && !r.wait {
            return Err(FieldError::new(
                field,
                "needs run.wait (without it the call returns once the process has started)",
            ));
        }
    }
    Ok(crate::compose::run_to_end::RunOptions {
        wait: r.wait,
        remove: r.remove,
        // Unset: the most, 10 minutes — within the server's bound on any call (11).
        timeout: match &r.timeout {
            Some(t) => Some(grace("run.timeout", Some(t))?),
            None => r.wait.then_some(MAX_GRACE),
        },
        output: r.output,
    })
}

/// A `timeout`: none (wait as long as it takes) when absent.
pub(super) fn timeout(d: Option<&prost_types::Duration>) -> Result<Option<Duration>, Status> {
    d.map(|t| grace("timeout", Some(t)))
        .transpose()
        .map_err(invalid)
}

/// Streams a log: replay from `from`, then (if `follow`) new output until the process's
/// output ends.
pub(super) fn log_stream(log: Arc<Log>, from: u64, follow: bool) -> ResponseStream<pb::LogChunk> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut next = from;
        let mut updates = log.subscribe();
        loop {
            // Whether the log was closed, seen *before* reading: a closed log gets no
            // more writes, so this read holds everything; an open one that is written
            // after this line wakes `changed()` below.
            let closed = updates.borrow_and_update().1;
            for c in log.read_from(next).0 {
                let chunk = super::convert::log_chunk(c, &mut next);
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
            if !follow || closed {
                return;
            }
            if updates.changed().await.is_err() {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
pub(super) mod test_support {
    //! Requests as they leave the authorization layer.

    use aurae_identity::SpiffeId;
    use tonic::Request;

    use crate::{api::authz::Caller, identity::Policy};

    /// `msg` sent to `method` by an identity whose grant covers the names `names`.
    pub fn request_as<T>(method: &str, names: &[&str], msg: T) -> Request<T> {
        let id: SpiffeId = "spiffe://aurae.local/test/client".parse().unwrap();
        let policy = Policy::parse(
            &format!("[[grant]]\nid = \"{id}\"\nmethods = [\"{method}\"]\nnames = {names:?}\n"),
            "test.toml",
            "aurae.local",
            crate::api::served_methods(),
        )
        .unwrap();
        let mut r = Request::new(msg);
        r.extensions_mut().insert(Caller {
            id: id.clone(),
            grant: policy.authorize(&id, method).unwrap(),
            method: method.into(),
            request_id: uuid::Uuid::nil(),
        });
        r
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;
    use tonic::Code;

    use super::{test_support::request_as, *};

    const LIST: &str = "aurae.runtime.v0.Cells/List";

    #[test]
    fn a_list_shows_what_its_prefix_and_the_grant_both_cover() {
        let show = visible(&request_as(LIST, &["team-a"], ()), "name_prefix", "team-").unwrap();
        assert!(show("team-a") && show("team-a/api"));
        assert!(!show("team-b") && !show("other"));
        let bad = visible(&request_as(LIST, &["team-a"], ()), "name_prefix", "/x").err();
        assert_eq!(bad.map(|s| s.code()), Some(Code::InvalidArgument));
        let unauthorized = visible(&Request::new(()), "name_prefix", "team-").err();
        assert_eq!(unauthorized.map(|s| s.code()), Some(Code::Internal));
    }

    #[test]
    fn durations_default_or_are_bounded() {
        assert_eq!(grace("grace_period", None).unwrap(), DEFAULT_GRACE);
        let too_long = prost_types::Duration {
            seconds: i64::try_from(MAX_GRACE.as_secs()).unwrap() + 1,
            nanos: 0,
        };
        let e = grace("grace_period", Some(&too_long)).unwrap_err();
        assert!(e.to_string().contains("grace_period"), "{e}");
        assert_eq!(timeout(None).unwrap(), None);
        let second = prost_types::Duration {
            seconds: 1,
            nanos: 0,
        };
        assert_eq!(
            timeout(Some(&second)).unwrap(),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            timeout(Some(&too_long)).unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    #[tokio::test]
    async fn a_log_streams_from_an_offset_and_ends_with_the_output() {
        let out = Arc::new(Log::new(None));
        out.append(crate::workload::log::Stream::Stdout, b"hello ");
        out.append(crate::workload::log::Stream::Stderr, b"world");
        out.close();
        let chunks: Vec<pb::LogChunk> = log_stream(out.clone(), 3, true)
            .map(|c| c.unwrap())
            .collect()
            .await;
        let got: Vec<(u64, i32, &[u8])> = chunks
            .iter()
            .map(|c| (c.offset, c.stream, c.data.as_slice()))
            .collect();
        assert_eq!(
            got,
            [
                (3, pb::LogStream::Stdout as i32, &b"lo "[..]),
                (6, pb::LogStream::Stderr as i32, &b"world"[..]),
            ]
        );
        let past_the_end: Vec<_> = log_stream(out, 11, false).collect().await;
        assert!(past_the_end.is_empty());
    }

    /// Output written and the log closed while a follower is still sending an earlier
    /// batch (its channel full): the follower sends the rest and ends, instead of
    /// waiting for a change that never comes.
    #[tokio::test]
    async fn a_follower_busy_sending_when_the_log_closes_still_ends() {
        let out = Arc::new(Log::new(None));
        // Alternating streams: one chunk each (same-stream writes may merge).
        let stream = |i: u8| {
            if i.is_multiple_of(2) {
                crate::workload::log::Stream::Stdout
            } else {
                crate::workload::log::Stream::Stderr
            }
        };
        for i in 0..40u8 {
            out.append(stream(i), &[i]);
        }
        let mut s = log_stream(out.clone(), 0, true);
        // The follower has read all 40 and blocks on its full channel.
        let first = s.next().await.unwrap().unwrap();
        assert_eq!(first.data, [0]);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        for i in 40..45u8 {
            out.append(stream(i), &[i]);
        }
        out.close();
        let rest: Vec<u8> = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            s.map(|c| c.unwrap().data).collect::<Vec<_>>(),
        )
        .await
        .expect("the stream ends once the closed log is sent")
        .concat();
        assert_eq!(rest, (1..45u8).collect::<Vec<_>>());
    }
}
