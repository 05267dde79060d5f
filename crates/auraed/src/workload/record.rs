//! Writing and deleting durable records ([`crate::store::Store`]) of what runs: a failure
//! is reported (a warning and a FAILED event naming the resource), never fatal — the
//! workload runs on, it just would not be found again after a restart. The record types
//! live with their nouns (`cell::record`, `vm::record`).

use std::sync::Arc;

use aurae_proto::runtime::v0 as pb;
use serde::Serialize;

use crate::{events::EventBus, store::Store};

/// Writes and deletes records; see the module documentation.
#[derive(Debug, Clone)]
pub struct Recorder {
    store: Option<Store>,
    events: Arc<EventBus>,
}

impl Recorder {
    /// `store: None` records nothing (unit tests, or a daemon without a state store).
    pub fn new(store: Option<Store>, events: Arc<EventBus>) -> Self {
        Self { store, events }
    }

    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    fn report(&self, kind: pb::Kind, name: &str, what: &str, e: &dyn std::fmt::Display) {
        tracing::warn!(resource = name, "{what}: {e}");
        self.events.emit(
            kind,
            name,
            pb::EventType::Failed,
            format!("{what} ({e}): it would not be found again after an auraed restart"),
        );
    }

    /// Writes the record `key` of `store_kind` (an event of `kind` if it fails).
    pub fn put<T: Serialize>(&self, kind: pb::Kind, store_kind: &str, key: &str, value: &T) {
        let Some(s) = &self.store else { return };
        if let Err(e) = s.put_atomic(store_kind, key, value) {
            self.report(kind, key, "its record could not be written", &e);
        }
    }

    /// Deletes the record `key` of `store_kind` (an event of `kind` if it fails).
    pub fn delete(&self, kind: pb::Kind, store_kind: &str, key: &str) {
        let Some(s) = &self.store else { return };
        if let Err(e) = s.delete(store_kind, key) {
            self.report(kind, key, "its record could not be deleted", &e);
        }
    }
}
