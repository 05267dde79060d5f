//! `aer events`: the Events service's one stream of every kind's lifecycle events.

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use clap::Args;
use serde_json::json;
use tonic::Status;

use super::{exit, ts};
use crate::output::{Format, Row, print};

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only events of names under this prefix, e.g. web (web and web/…) [default: all].
    #[arg(long, default_value = "", value_name = "NAME")]
    prefix: String,
    /// First replay the kept events after this sequence number (the SEQ column), e.g.
    /// 0 for all kept; then follow.
    #[arg(long, default_value_t = 0, value_name = "SEQ")]
    after: u64,
}

fn event_row(e: &pb::Event) -> Row {
    let kind = pb::Kind::try_from(e.kind).map_or("?", |k| k.as_str_name());
    let ty = pb::EventType::try_from(e.r#type).map_or("?", |t| t.as_str_name());
    vec![
        ("seq", json!(e.sequence)),
        ("at", ts(e.at.as_ref())),
        ("kind", json!(kind)),
        ("name", json!(e.name)),
        ("type", json!(ty)),
        ("exit", exit(e.exit.as_ref())),
        ("message", json!(e.message)),
    ]
}

/// Follows the stream until auraed ends it, one printed row per event.
pub async fn run(c: &Client, a: EventsArgs, fmt: Format) -> Result<(), Status> {
    let req = pb::WatchEventsRequest {
        kinds: vec![],
        name_prefix: a.prefix,
        after_sequence: a.after,
    };
    let mut s = c.events().watch(req).await?.into_inner();
    while let Some(e) = s.message().await? {
        print(fmt, &[event_row(&e)], false);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Command, parse};

    #[test]
    fn events_flags_and_rows() {
        let Command::Events(a) = parse("events --prefix web --after 7").unwrap() else {
            panic!("not aer events")
        };
        assert_eq!((a.prefix.as_str(), a.after), ("web", 7));
        let Command::Events(a) = parse("events").unwrap() else {
            panic!("not aer events")
        };
        assert_eq!((a.prefix.as_str(), a.after), ("", 0));
        let e = pb::Event {
            sequence: 3,
            kind: pb::Kind::Cell as i32,
            r#type: -1,
            name: "web".into(),
            ..Default::default()
        };
        let row = event_row(&e);
        let get = |k| row.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(get("seq"), Some(json!(3)));
        assert_eq!(get("kind"), Some(json!("KIND_CELL")));
        assert_eq!(get("type"), Some(json!("?")));
    }
}
