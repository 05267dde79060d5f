//! `Events`: the numbered lifecycle events, replayed from a sequence number then followed,
//! filtered by kind, name prefix and the caller's grant.

use std::sync::Arc;

use aurae_proto::runtime::v0::{self as pb, events_server::Events};
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

use super::{authz::Caller, shared::ResponseStream, status::invalid};
use crate::{
    events::EventBus,
    spec::{known_enum, name_prefix},
};

#[derive(Debug, Clone)]
pub struct EventsApi {
    events: Arc<EventBus>,
}

impl EventsApi {
    pub fn new(events: Arc<EventBus>) -> Self {
        Self { events }
    }
}

/// The name the grant is checked against: an executable's event is about its cell
/// (`team-a/api` of cell `team-a` is not cell `team-a/api`).
fn event_resource(e: &pb::Event) -> &str {
    if e.kind == pb::Kind::Executable as i32 {
        e.name.rsplit_once('/').map_or("", |(cell, _)| cell)
    } else {
        &e.name
    }
}

#[tonic::async_trait]
impl Events for EventsApi {
    type WatchStream = ResponseStream<pb::Event>;
    async fn watch(
        &self,
        r: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = Caller::of(&r)?;
        let m = r.into_inner();
        for (i, k) in m.kinds.iter().enumerate() {
            known_enum::<pb::Kind>(&format!("kinds[{i}]"), *k, false).map_err(invalid)?;
        }
        let prefix = name_prefix("name_prefix", &m.name_prefix).map_err(invalid)?;
        let kinds = m.kinds;
        let wanted = move |e: &pb::Event| {
            (kinds.is_empty() || kinds.contains(&e.kind))
                && e.name.starts_with(&prefix)
                && caller.grant.allows_name(event_resource(e))
        };
        let (replay, rx) = self.events.subscribe(m.after_sequence);
        Ok(Response::new(forward(replay, rx, wanted)))
    }
}

/// The `wanted` events of `replay`, then those `rx` brings with a higher sequence number,
/// until the bus closes; a watcher that falls behind gets `RESOURCE_EXHAUSTED` and resumes.
fn forward(
    replay: Vec<pb::Event>,
    mut rx: broadcast::Receiver<pb::Event>,
    wanted: impl Fn(&pb::Event) -> bool + Send + 'static,
) -> ResponseStream<pb::Event> {
    let (tx, out) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut last = 0;
        for e in replay {
            last = e.sequence;
            if wanted(&e) && tx.send(Ok(e)).await.is_err() {
                return;
            }
        }
        loop {
            match rx.recv().await {
                Ok(e) if e.sequence > last => {
                    last = e.sequence;
                    if wanted(&e) && tx.send(Ok(e)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let _ = tx
                        .send(Err(Status::resource_exhausted(format!(
                            "watcher fell {n} events behind; resume with after_sequence"
                        ))))
                        .await;
                    return;
                }
                Err(_) => return,
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    fn event(sequence: u64, name: &str) -> pb::Event {
        pb::Event {
            sequence,
            kind: pb::Kind::Cell as i32,
            name: name.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn replay_then_newer_wanted_events_until_the_bus_closes() {
        let (tx, rx) = broadcast::channel(8);
        for (seq, name) in [(2, "a"), (3, "b"), (4, "a")] {
            tx.send(event(seq, name)).unwrap();
        }
        drop(tx);
        let replay = vec![event(1, "a"), event(2, "a")];
        let got: Vec<u64> = forward(replay, rx, |e| e.name == "a")
            .map(|e| e.unwrap().sequence)
            .collect()
            .await;
        assert_eq!(got, [1, 2, 4], "2 again is skipped, b is not wanted");
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_is_told_to_resume() {
        let (tx, rx) = broadcast::channel(1);
        tx.send(event(1, "a")).unwrap();
        tx.send(event(2, "a")).unwrap();
        let got: Vec<_> = forward(Vec::new(), rx, |_| true).collect().await;
        let [Err(e)] = got.as_slice() else {
            panic!("{got:?}")
        };
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("after_sequence"), "{}", e.message());
    }

    #[test]
    fn executable_events_are_about_their_cell() {
        let ev = |kind: pb::Kind, name: &str| pb::Event {
            kind: kind as i32,
            name: name.into(),
            ..Default::default()
        };
        assert_eq!(
            event_resource(&ev(pb::Kind::Executable, "team-a/api")),
            "team-a"
        );
        assert_eq!(
            event_resource(&ev(pb::Kind::Executable, "team-a/api/web")),
            "team-a/api"
        );
        assert_eq!(event_resource(&ev(pb::Kind::Executable, "noslash")), "");
        assert_eq!(
            event_resource(&ev(pb::Kind::Cell, "team-a/api")),
            "team-a/api"
        );
    }
}
