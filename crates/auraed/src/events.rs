//! Lifecycle events of every kind, numbered, with a bounded history for replay.

use std::{collections::VecDeque, sync::Mutex, time::SystemTime};

use aurae_proto::runtime::v0 as pb;
use tokio::sync::broadcast;

/// Events kept for replay.
pub const HISTORY: usize = 4096;

#[derive(Debug)]
pub struct EventBus {
    tx: broadcast::Sender<pb::Event>,
    history: Mutex<(u64, VecDeque<pb::Event>)>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(1024).0,
            history: Mutex::new((0, VecDeque::new())),
        }
    }
}

impl EventBus {
    /// Numbers, records and broadcasts an event.
    pub fn publish(&self, mut e: pb::Event) {
        let Ok(mut h) = self.history.lock() else {
            return;
        };
        h.0 += 1;
        e.sequence = h.0;
        e.at = Some(SystemTime::now().into());
        h.1.push_back(e.clone());
        if h.1.len() > HISTORY {
            h.1.pop_front();
        }
        // Sent under the lock, so replay + subscription never miss or reorder one.
        let _ = self.tx.send(e);
    }

    /// Shorthand for the common fields.
    pub fn emit(&self, kind: pb::Kind, name: &str, ty: pb::EventType, message: impl Into<String>) {
        self.publish(pb::Event {
            kind: kind as i32,
            name: name.to_owned(),
            r#type: ty as i32,
            message: message.into(),
            ..Default::default()
        });
    }

    /// Kept events after `after` (0 = none), and a receiver for the ones that follow.
    pub fn subscribe(&self, after: u64) -> (Vec<pb::Event>, broadcast::Receiver<pb::Event>) {
        let Ok(h) = self.history.lock() else {
            return (Vec::new(), self.tx.subscribe());
        };
        let rx = self.tx.subscribe();
        let replay = if after == 0 {
            Vec::new()
        } else {
            h.1.iter().filter(|e| e.sequence > after).cloned().collect()
        };
        (replay, rx)
    }
}

/// How a process ended, as events and statuses carry it (`None`: the status is not known —
/// the process was not auraed's child when it ended).
pub fn exit_status(
    status: Option<aurae_sys::ExitStatus>,
    oom_killed: bool,
    at: std::time::SystemTime,
) -> pb::ExitStatus {
    pb::ExitStatus {
        how: status.map(|s| match s {
            aurae_sys::ExitStatus::Code(c) => pb::exit_status::How::Code(c),
            aurae_sys::ExitStatus::Signal(s) => pb::exit_status::How::Signal(s),
        }),
        oom_killed,
        exited_at: Some(at.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replay_then_follow_in_order() {
        let bus = EventBus::default();
        bus.emit(pb::Kind::Cell, "a", pb::EventType::Created, "");
        bus.emit(pb::Kind::Cell, "b", pb::EventType::Created, "");
        let (replay, mut rx) = bus.subscribe(1);
        assert_eq!(replay.len(), 1);
        assert_eq!(replay[0].name, "b");
        bus.emit(pb::Kind::Cell, "c", pb::EventType::Freed, "");
        let e = rx.recv().await.unwrap();
        assert_eq!((e.sequence, e.name.as_str()), (3, "c"));
    }
}
