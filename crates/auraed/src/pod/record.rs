//! Durable records of pods. A pod is recorded once RunPod made it (and again when its
//! container ends; deleted when freed). After a restart its instance is re-adopted by
//! `Instances::readopt` first; a pod whose instance came back is served again, one whose
//! instance did not is reported and forgotten.

use std::time::SystemTime;

use aurae_proto::runtime::v0 as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Pod, PodState};
use crate::{instance::Instances, spec::Label, workload::Phase};

/// What is recorded of a pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodRecord {
    pub name: Label,
    pub image: String,
    pub container: Label,
    pub listen_port: Option<u16>,
    pub created_at: SystemTime,
    /// Set once the pod ended: (code, signal, OOM-killed, message).
    pub ended: Option<(Option<i32>, Option<i32>, bool, String)>,
    /// Whether it ended FAILED (else EXITED: a clean end, or a stop).
    #[serde(default)]
    pub failed: bool,
}

impl PodRecord {
    pub fn of(p: &Pod) -> Self {
        let s = p.state.borrow();
        let ended = matches!(s.phase, Phase::Exited | Phase::Failed).then(|| {
            let (code, signal) = match s.exit.as_ref().and_then(|e| e.how) {
                Some(pb::exit_status::How::Code(c)) => (Some(c), None),
                Some(pb::exit_status::How::Signal(n)) => (None, Some(n)),
                None => (None, None),
            };
            let oom = s.exit.as_ref().is_some_and(|e| e.oom_killed);
            (code, signal, oom, s.message.clone())
        });
        Self {
            name: p.name.clone(),
            image: p.image.clone(),
            container: p.container.clone(),
            listen_port: p.listen_port,
            created_at: p.created_at,
            ended,
            failed: s.phase == Phase::Failed,
        }
    }

    /// The pod again, if its instance was re-adopted; else why not.
    pub fn readopt(self, instances: &Instances) -> Result<Pod, String> {
        let instance = instances
            .find(&self.name)
            .map_err(|_| "its instance is gone".to_owned())?;
        let state = match self.ended {
            Some((code, signal, oom, message)) => PodState {
                phase: if self.failed {
                    Phase::Failed
                } else {
                    Phase::Exited
                },
                message,
                exit: (code.is_some() || signal.is_some()).then_some(pb::ExitStatus {
                    how: code
                        .map(pb::exit_status::How::Code)
                        .or(signal.map(pb::exit_status::How::Signal)),
                    oom_killed: oom,
                    exited_at: None,
                }),
            },
            None => PodState {
                phase: Phase::Running,
                message: String::new(),
                exit: None,
            },
        };
        Ok(Pod {
            name: self.name,
            instance,
            image: self.image,
            container: self.container,
            listen_port: self.listen_port,
            created_at: self.created_at,
            state: watch::channel(state).0,
        })
    }
}
