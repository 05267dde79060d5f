//! Pods: a container in a cell of an instance spawned for it alone. [`Pods`] keeps the
//! pods this auraed runs and their lifecycle; `compose::run_pod` makes one. The instance
//! is the pod's isolation and its accounting on this machine (its cgroup here holds the
//! child auraed and the container, or the VMM and the whole guest); the container runs
//! in the instance through the instance's own API, called with this auraed's identity.

pub mod record;
pub mod spec;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use aurae_proto::runtime::v0 as pb;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tracing::{info, warn};

pub use spec::PodSpec;

use crate::{
    cell::CellStats,
    events::EventBus,
    instance::{Instance, Instances},
    spec::Label,
    store::kinds,
    workload::{Phase, WorkloadError, record::Recorder},
};

/// Where a pod is.
#[derive(Debug, Clone)]
pub struct PodState {
    pub phase: Phase,
    pub message: String,
    /// The container's end, as the instance reported it.
    pub exit: Option<pb::ExitStatus>,
}

/// One pod.
#[derive(Debug)]
pub struct Pod {
    pub name: Label,
    pub instance: Arc<Instance>,
    /// `<registry>/<repository>@<manifest digest>`.
    pub image: String,
    /// The container's executable name in the pod's cell in the instance.
    pub container: Label,
    pub listen_port: Option<u16>,
    pub created_at: SystemTime,
    pub state: watch::Sender<PodState>,
}

impl Pod {
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.listen_port
            .map(|p| SocketAddr::from((self.instance.addr, p)))
    }

    pub fn phase(&self) -> Phase {
        self.state.borrow().phase
    }

    /// The container's executable as the instance names it (`<cell>/<executable>`).
    pub fn executable(&self) -> String {
        format!("{}/{}", self.name, self.container)
    }

    pub fn executable_ref(&self) -> pb::ExecutableRef {
        pb::ExecutableRef {
            cell: self.name.to_string(),
            name: self.container.to_string(),
        }
    }

    fn ended(s: &PodState) -> bool {
        matches!(s.phase, Phase::Exited | Phase::Failed)
    }

    /// Waits for the pod to end, at most `timeout`.
    pub async fn wait(&self, timeout: Option<Duration>) -> bool {
        let mut rx = self.state.subscribe();
        let w = rx.wait_for(Self::ended);
        match timeout {
            Some(t) => tokio::time::timeout(t, w).await.is_ok_and(|r| r.is_ok()),
            None => w.await.is_ok(),
        }
    }

    fn set(&self, f: impl FnOnce(&mut PodState)) {
        self.state.send_modify(f);
    }
}

/// A pod's usage: on this machine (its instance's cgroup) and in the instance (its cell).
#[derive(Debug, Clone, Default)]
pub struct PodUsage {
    pub host: Option<CellStats>,
    pub host_memory_max: Option<u64>,
    pub cell: Option<pb::ResourceStats>,
    /// The pod's cell as the instance reports it.
    pub cell_status: Option<pb::CellStatus>,
    /// Why the instance's side is missing.
    pub cell_error: Option<String>,
}

/// The pods of this auraed.
pub struct Pods {
    instances: Arc<Instances>,
    events: Arc<EventBus>,
    recorder: Recorder,
    pods: Mutex<BTreeMap<Label, Arc<Pod>>>,
    /// Names a RunPod is making right now.
    making: Mutex<BTreeSet<Label>>,
}

impl std::fmt::Debug for Pods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pods").finish_non_exhaustive()
    }
}

/// A name held by a RunPod in progress; released when dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    pods: &'a Pods,
    name: Label,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.pods.making.lock() {
            m.remove(&self.name);
        }
    }
}

impl Pods {
    pub fn new(
        instances: Arc<Instances>,
        events: Arc<EventBus>,
        store: Option<crate::store::Store>,
    ) -> Self {
        Self {
            instances,
            recorder: Recorder::new(store, events.clone()),
            events,
            pods: Mutex::new(BTreeMap::new()),
            making: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn instances(&self) -> &Arc<Instances> {
        &self.instances
    }

    pub fn events(&self) -> &Arc<EventBus> {
        &self.events
    }

    /// Holds `name` for a RunPod: refused if a pod, a pod being made or an instance has it.
    pub fn reserve(&self, name: &Label) -> Result<Reservation<'_>, WorkloadError> {
        let taken = || WorkloadError::Exists(format!("pod {:?} already exists", name.as_str()));
        if self.find(name).is_ok() {
            return Err(taken());
        }
        if self.instances.find(name).is_ok() {
            return Err(WorkloadError::Exists(format!(
                "an instance named {:?} already exists (a pod's instance takes its name)",
                name.as_str()
            )));
        }
        let mut m = self
            .making
            .lock()
            .map_err(|_| WorkloadError::Precondition("pods: lock poisoned".into()))?;
        if !m.insert(name.clone()) {
            return Err(taken());
        }
        Ok(Reservation {
            pods: self,
            name: name.clone(),
        })
    }

    /// Whether a pod has `name`, or a RunPod is making one of that name.
    pub fn holds(&self, name: &Label) -> bool {
        self.find(name).is_ok() || self.making.lock().is_ok_and(|m| m.contains(name))
    }

    pub fn find(&self, name: &Label) -> Result<Arc<Pod>, WorkloadError> {
        self.pods
            .lock()
            .ok()
            .and_then(|m| m.get(name).cloned())
            .ok_or_else(|| {
                WorkloadError::NotFound(format!("pod {:?} does not exist", name.as_str()))
            })
    }

    /// Pods whose names pass `visible`, in name order.
    pub fn list(&self, visible: impl Fn(&str) -> bool) -> Vec<Arc<Pod>> {
        self.pods
            .lock()
            .map(|m| {
                m.values()
                    .filter(|p| visible(p.name.as_str()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Takes a made pod in: recorded, its instance's events followed.
    pub fn insert(self: &Arc<Self>, pod: Arc<Pod>, _held: Reservation<'_>) {
        if let Ok(mut m) = self.pods.lock() {
            m.insert(pod.name.clone(), pod.clone());
        }
        self.recorder.put(
            pb::Kind::Pod,
            kinds::POD,
            pod.name.as_str(),
            &record::PodRecord::of(&pod),
        );
        self.events.emit(
            pb::Kind::Pod,
            pod.name.as_str(),
            pb::EventType::Started,
            format!("image {}", pod.image),
        );
        self.follow(pod);
    }

    /// Follows the pod's instance: the container's events there become the pod's events
    /// here (its exit ends the pod); the instance ending first fails the pod.
    fn follow(self: &Arc<Self>, pod: Arc<Pod>) {
        let pods = self.clone();
        tokio::spawn(async move {
            let mut after = 0u64;
            let mut warned = false;
            let mut limit = RateLimit::default();
            loop {
                if Pod::ended(&pod.state.borrow()) {
                    return;
                }
                let watch = async {
                    let c = pods.instances.connect(&pod.instance).await?;
                    // Watch first, then look: an end between the two is in the stream.
                    let req = pb::WatchEventsRequest {
                        kinds: vec![],
                        name_prefix: pod.name.to_string(),
                        after_sequence: after,
                    };
                    let mut s = c
                        .events()
                        .watch(req)
                        .await
                        .map_err(|e| WorkloadError::Precondition(e.message().to_owned()))?
                        .into_inner();
                    if let Ok(st) = c.executables().get(pod.executable_ref()).await {
                        pods.sync_exit(&pod, st.into_inner());
                    }
                    while let Some(e) = s.next().await {
                        let e =
                            e.map_err(|e| WorkloadError::Precondition(e.message().to_owned()))?;
                        after = after.max(e.sequence);
                        if limit.admit() {
                            pods.forward(&pod, e);
                        } else if let Some(n) = limit.report() {
                            warn!(pod = %pod.name, dropped = n, "the instance sends more than {EVENTS_PER_SECOND} events a second: the rest are dropped");
                        }
                    }
                    Ok::<(), WorkloadError>(())
                };
                tokio::select! {
                    r = watch => {
                        if let Err(e) = r && !warned && !pod.instance.gone() {
                            warn!(pod = %pod.name, "following the instance's events: {e}; trying again");
                            warned = true;
                        }
                    }
                    _ = pod.instance.wait(None) => {}
                }
                if pod.instance.gone() {
                    pods.instance_ended(&pod);
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// The container's status as the instance gives it: an end not seen yet ends the pod
    /// (one that came while this auraed was down, or before its events were followed).
    fn sync_exit(&self, pod: &Pod, st: pb::ExecutableStatus) {
        let phase = pb::Phase::try_from(st.phase).unwrap_or(pb::Phase::Unspecified);
        if matches!(phase, pb::Phase::Exited | pb::Phase::Failed)
            && !Pod::ended(&pod.state.borrow())
        {
            self.forward(
                pod,
                pb::Event {
                    kind: pb::Kind::Executable as i32,
                    name: pod.executable(),
                    r#type: pb::EventType::Exited as i32,
                    exit: st.exit,
                    message: st.message,
                    ..Default::default()
                },
            );
        }
    }

    /// The container's output from the instance: replay from `from`, then follow.
    pub async fn logs(
        &self,
        pod: &Pod,
        follow: bool,
        from: u64,
    ) -> Result<tonic::Streaming<pb::LogChunk>, WorkloadError> {
        if pod.instance.gone() {
            return Err(WorkloadError::Precondition(format!(
                "pod {:?}: its instance has ended, and the container's output with it",
                pod.name.as_str()
            )));
        }
        let open = async {
            let c = self.instances.connect(&pod.instance).await?;
            c.executables()
                .logs(pb::ExecutableLogsRequest {
                    executable: Some(pod.executable_ref()),
                    follow,
                    from_offset: from,
                })
                .await
                .map(|r| r.into_inner())
                .map_err(|e| WorkloadError::Precondition(format!("the instance: {}", e.message())))
        };
        tokio::time::timeout(Duration::from_secs(10), open)
            .await
            .unwrap_or_else(|_| {
                Err(WorkloadError::Deadline(
                    "the pod's instance did not answer within 10 s".into(),
                ))
            })
    }

    /// One event of the instance about the pod's cell, re-emitted as the pod's. The
    /// instance is not trusted: only events of the pod's cell and its executables pass
    /// (whatever the instance's own filter did), their texts cut to [`EVENT_TEXT`] bytes.
    fn forward(&self, pod: &Pod, mut e: pb::Event) {
        let cell = pod.name.as_str();
        let about_pod = e.name == cell
            || e.name
                .strip_prefix(cell)
                .is_some_and(|rest| rest.starts_with('/'));
        if !about_pod || e.name.len() > 256 {
            return;
        }
        cut(&mut e.message);
        cut(&mut e.victim_command);
        let kind = match pb::Kind::try_from(e.kind) {
            Ok(pb::Kind::Executable) => "container",
            Ok(pb::Kind::Cell) => "cell",
            _ => "instance",
        };
        let ty = pb::EventType::try_from(e.r#type).unwrap_or(pb::EventType::Unspecified);
        let ours = e.name == pod.executable();
        // The end of the container: EXITED, FAILED, or OOM_KILLED (which replaces EXITED).
        let end = matches!(
            ty,
            pb::EventType::Exited | pb::EventType::Failed | pb::EventType::OomKilled
        );
        if ours && end {
            let code = e.exit.as_ref().and_then(|x| x.how);
            let clean = matches!(code, Some(pb::exit_status::How::Code(0)));
            let mut changed = false;
            pod.set(|s| {
                if !Pod::ended(s) {
                    changed = true;
                    s.phase = if clean || s.phase == Phase::Stopping {
                        Phase::Exited
                    } else {
                        Phase::Failed
                    };
                    s.exit = e.exit;
                    s.message = format!("the container ended: {}", describe_exit(e.exit.as_ref()));
                }
            });
            // Recorded once, and only for a pod still ours (not freed meanwhile).
            if changed && self.find(&pod.name).is_ok_and(|p| std::ptr::eq(&*p, pod)) {
                self.recorder.put(
                    pb::Kind::Pod,
                    kinds::POD,
                    pod.name.as_str(),
                    &record::PodRecord::of(pod),
                );
            }
        }
        self.events.publish(pb::Event {
            kind: pb::Kind::Pod as i32,
            name: pod.name.to_string(),
            r#type: e.r#type,
            exit: e.exit,
            victim_pid: e.victim_pid,
            victim_command: e.victim_command,
            message: format!("{kind} {}: {}", e.name, e.message)
                .trim_end_matches([':', ' '])
                .to_owned(),
            ..Default::default()
        });
    }

    fn instance_ended(&self, pod: &Pod) {
        let why = pod.instance.state.borrow().message.clone();
        let mut failed = false;
        pod.set(|s| {
            if !Pod::ended(s) {
                failed = s.phase != Phase::Stopping;
                s.phase = if failed { Phase::Failed } else { Phase::Exited };
                s.message = if why.is_empty() {
                    "the pod's instance ended".into()
                } else {
                    format!("the pod's instance ended: {why}")
                };
            }
        });
        if failed {
            warn!(pod = %pod.name, "{}", pod.state.borrow().message);
            self.events.emit(
                pb::Kind::Pod,
                pod.name.as_str(),
                pb::EventType::Failed,
                pod.state.borrow().message.clone(),
            );
        }
    }

    /// The pod's usage here and in its instance (the instance's side within 2 s).
    pub async fn usage(&self, pod: &Pod) -> PodUsage {
        let mut u = PodUsage::default();
        if let Some((host, max)) = self.instances.host_stats(&pod.instance) {
            u.host = Some(host);
            u.host_memory_max = max;
        }
        if pod.instance.gone() {
            u.cell_error = Some("the instance has ended".into());
            return u;
        }
        let ask = async {
            let c = self.instances.connect(&pod.instance).await?;
            let cell = pb::NameRef {
                name: pod.name.to_string(),
            };
            let err = |e: tonic::Status| WorkloadError::Precondition(e.message().to_owned());
            let stats = c.cells().stats(cell.clone()).await.map_err(err)?;
            let status = c.cells().get(cell).await.map_err(err)?;
            Ok::<_, WorkloadError>((stats.into_inner(), status.into_inner()))
        };
        match tokio::time::timeout(Duration::from_secs(2), ask).await {
            Ok(Ok((stats, status))) => {
                u.cell = Some(stats);
                u.cell_status = Some(status);
            }
            Ok(Err(e)) => u.cell_error = Some(e.to_string()),
            Err(_) => u.cell_error = Some("the instance did not answer within 2 s".into()),
        }
        u
    }

    /// Stops the container in the instance (its grace), then the instance.
    pub async fn stop(&self, name: &Label, grace: Duration) -> Result<Arc<Pod>, WorkloadError> {
        let pod = self.find(name)?;
        if Pod::ended(&pod.state.borrow()) && pod.instance.gone() {
            return Ok(pod);
        }
        pod.set(|s| {
            if !Pod::ended(s) {
                s.phase = Phase::Stopping;
            }
        });
        if !pod.instance.gone() {
            let stop = async {
                let c = self.instances.connect(&pod.instance).await?;
                c.cells()
                    .stop(pb::StopRequest {
                        name: pod.name.to_string(),
                        grace_period: prost_types::Duration::try_from(grace).ok(),
                    })
                    .await
                    .map_err(|e| WorkloadError::Precondition(e.message().to_owned()))
            };
            match tokio::time::timeout(grace + Duration::from_secs(10), stop).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    warn!(pod = %name, "stopping the container: {e}; stopping the instance")
                }
                Err(_) => {
                    warn!(pod = %name, "the container did not stop in time; stopping the instance")
                }
            }
            self.instances.stop(name, grace).await?;
        }
        pod.set(|s| {
            if !Pod::ended(s) {
                s.phase = Phase::Exited;
                s.message = "stopped".into();
            }
        });
        if self.find(name).is_ok_and(|p| Arc::ptr_eq(&p, &pod)) {
            self.recorder.put(
                pb::Kind::Pod,
                kinds::POD,
                name.as_str(),
                &record::PodRecord::of(&pod),
            );
        }
        self.events
            .emit(pb::Kind::Pod, name.as_str(), pb::EventType::Stopped, "");
        Ok(pod)
    }

    /// Removes the pod and its instance (killed if it still runs).
    pub async fn free(&self, name: &Label) -> Result<(), WorkloadError> {
        let pod = self.find(name)?;
        // Exactly the pod's instance: an instance of that name spawned after it was freed
        // by hand is not the pod's.
        self.instances.free_exact(&pod.instance).await?;
        pod.set(|s| {
            if !Pod::ended(s) {
                s.phase = Phase::Exited;
                s.message = "freed".into();
            }
        });
        if let Ok(mut m) = self.pods.lock() {
            m.remove(name);
        }
        self.recorder
            .delete(pb::Kind::Pod, kinds::POD, name.as_str());
        self.events
            .emit(pb::Kind::Pod, name.as_str(), pb::EventType::Freed, "");
        info!(pod = %name, "freed");
        Ok(())
    }

    /// At the ordered shutdown, after the instances were stopped: every pod is gone with
    /// its instance, and its record with it.
    pub fn forget_all(&self) {
        let all = self
            .pods
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default();
        for name in all.keys() {
            self.recorder
                .delete(pb::Kind::Pod, kinds::POD, name.as_str());
        }
    }

    /// Pods of a previous auraed whose instances were taken back are served again; the
    /// others are forgotten, each one reported.
    pub fn readopt(self: &Arc<Self>) -> Vec<String> {
        let mut warnings = Vec::new();
        let Some(store) = self.recorder.store().cloned() else {
            return warnings;
        };
        let loaded = store.load::<record::PodRecord>(kinds::POD);
        warnings.extend(loaded.quarantined);
        for (key, r) in loaded.records {
            match r.readopt(&self.instances) {
                Ok(pod) => {
                    let pod = Arc::new(pod);
                    if let Ok(mut m) = self.pods.lock() {
                        m.insert(pod.name.clone(), pod.clone());
                    }
                    info!(pod = %pod.name, "re-adopted");
                    self.follow(pod);
                }
                Err(why) => {
                    let w = format!("pod {key:?} of the previous auraed was not re-adopted: {why}");
                    self.events
                        .emit(pb::Kind::Pod, &key, pb::EventType::Failed, w.clone());
                    warnings.push(w);
                    self.recorder.delete(pb::Kind::Pod, kinds::POD, &key);
                }
            }
        }
        warnings
    }
}

/// "code 3", "signal 9", "code 137 (OOM-killed)".
pub fn describe_exit(e: Option<&pb::ExitStatus>) -> String {
    let Some(e) = e else {
        return "no exit status".into();
    };
    let how = match e.how {
        Some(pb::exit_status::How::Code(c)) => format!("exit code {c}"),
        Some(pb::exit_status::How::Signal(s)) => format!("signal {s}"),
        None => "no exit status".into(),
    };
    if e.oom_killed {
        format!("{how} (OOM-killed)")
    } else {
        how
    }
}

/// Longest text of a forwarded event (message, victim command).
pub const EVENT_TEXT: usize = 1024;
/// Most events a second forwarded from one pod's instance.
pub const EVENTS_PER_SECOND: u32 = 100;

/// Cuts `s` to [`EVENT_TEXT`] bytes (at a character boundary).
fn cut(s: &mut String) {
    if s.len() > EVENT_TEXT {
        let mut at = EVENT_TEXT;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
        s.push('…');
    }
}

/// At most [`EVENTS_PER_SECOND`] a second; what is dropped is counted and reported once
/// a second.
#[derive(Debug)]
struct RateLimit {
    window: std::time::Instant,
    passed: u32,
    dropped: u64,
    reported: std::time::Instant,
}

impl Default for RateLimit {
    fn default() -> Self {
        let now = std::time::Instant::now();
        Self {
            window: now,
            passed: 0,
            dropped: 0,
            reported: now,
        }
    }
}

impl RateLimit {
    fn admit(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = std::time::Instant::now();
            self.passed = 0;
        }
        if self.passed < EVENTS_PER_SECOND {
            self.passed += 1;
            true
        } else {
            self.dropped += 1;
            false
        }
    }

    /// Dropped events to report, at most once a second.
    fn report(&mut self) -> Option<u64> {
        (self.dropped > 0 && self.reported.elapsed() >= Duration::from_secs(1)).then(|| {
            self.reported = std::time::Instant::now();
            std::mem::take(&mut self.dropped)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_texts_are_cut_and_events_rate_limited() {
        let mut s = "é".repeat(EVENT_TEXT);
        cut(&mut s);
        assert!(s.len() <= EVENT_TEXT + '…'.len_utf8(), "{}", s.len());
        let mut short = "ok".to_owned();
        cut(&mut short);
        assert_eq!(short, "ok");
        let mut l = RateLimit::default();
        let passed = (0..1000).filter(|_| l.admit()).count();
        assert_eq!(passed, EVENTS_PER_SECOND as usize);
        assert_eq!(l.dropped, 1000 - u64::from(EVENTS_PER_SECOND));
    }
}
