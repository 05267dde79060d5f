//! What a start can make before it knows who it is. An instance template makes it
//! before its snapshot (`pid1::prepare` calls [`make`]), so every copy restored from the
//! template starts with it made: the sealed copy of auraed, the reaper and the output
//! holder (a process: auraed re-executed), the reflection services and the list of
//! served methods, the cells' cgroup root and the async runtime (its worker threads).
//! Without a template nothing is made ahead.
//!
//! Nothing made here may differ between two restored copies or be one's secret: no key,
//! no random value, not the kernel's boot ID (the kernel makes it when it is first read:
//! read after the restore, each copy has its own; the holder is named with it only then,
//! [`Holder::in_this_boot`]). Hash maps made here keep the keys they were drawn with,
//! shared by every copy, so none made here holds what a client chooses: the reflection
//! services' maps hold our own descriptors (the `Routes` they are in later gets the API's
//! fixed paths), and the reaper's children are in a `BTreeMap`.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use crate::{reaper::Reaper, workload::holder::Holder};

/// What [`make`] made, for the start to take (`take_*`); each `None` once taken, or
/// when it could not be made (then the start makes it as without a template).
#[derive(Debug)]
struct MadeAhead {
    reaper: Option<Arc<Reaper>>,
    /// The output holder, a child tracked by `reaper`.
    holder: Option<Holder>,
    /// [`crate::api::reflection_routes`].
    reflection: Option<tonic::service::Routes>,
    /// The async runtime (its worker threads started): see [`runtime`].
    runtime: Option<tokio::runtime::Runtime>,
}

static MADE: Mutex<Option<MadeAhead>> = Mutex::new(None);

/// Makes everything above (blocking; before the async runtime exists) and keeps it for
/// the start (`take_*`). `cgroup_root` is where the start will keep its cells. Problems are added to
/// `warnings`: each thing not made here is made by the start as without a template.
pub fn make(cgroup_root: &Path, warnings: &mut Vec<String>) {
    if let Err(e) = aurae_sys::memfd::make_ahead() {
        warnings.push(format!("the sealed copy of auraed, made ahead: {e}"));
    }
    // Creating a group with every controller enabled is ~0.1 s there; the start opens
    // it again (and finds it made).
    if let Err(e) = crate::workload::cgroup::FsTree::open(cgroup_root) {
        warnings.push(format!("the cells' cgroup root, made ahead: {e}"));
    }
    // The holder is this thread's child (a thread's children move to another thread
    // when it ends: not worth depending on).
    let reaper = Arc::new(Reaper::default());
    let holder = Holder::start_before_boot_id(&aurae_sys::memfd::SealedSelf::default(), &reaper)
        .map_err(|e| warnings.push(format!("the output holder, made ahead: {e}")))
        .ok();
    // Decoded once per process, kept in a static (a `BTreeSet`: no hash keys).
    let _ = crate::api::served_methods();
    let reflection = std::thread::Builder::new()
        .name("made-ahead".into())
        .spawn(crate::api::reflection_routes)
        .map_err(|e| e.to_string())
        .and_then(|t| t.join().map_err(|_| "its thread panicked".to_owned()))
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|e| warnings.push(format!("the reflection services, made ahead: {e}")))
        .ok();
    let runtime = runtime()
        .map_err(|e| warnings.push(format!("the async runtime, made ahead: {e}")))
        .ok();
    if let Ok(mut m) = MADE.lock() {
        *m = Some(MadeAhead {
            reaper: Some(reaper),
            holder,
            reflection,
            runtime,
        });
    }
}

/// The async runtime auraed serves on. A PID 1 auraed takes the one made ahead
/// ([`take_runtime`]) or makes it. Nothing runs on its workers before [`crate::server::run`]
/// is spawned onto them: their threads' hash keys are drawn then, after a restore.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// What [`make`] made, each taken once; `None` without a template.
fn take<T>(part: impl FnOnce(&mut MadeAhead) -> Option<T>) -> Option<T> {
    MADE.lock().ok().and_then(|mut m| m.as_mut().and_then(part))
}

/// The runtime made ahead.
pub fn take_runtime() -> Option<tokio::runtime::Runtime> {
    take(|m| m.runtime.take())
}

/// The reaper made ahead: the one tracking the holder made ahead.
pub fn take_reaper() -> Option<Arc<Reaper>> {
    take(|m| m.reaper.take())
}

/// The output holder made ahead (named without the boot ID: see
/// [`Holder::in_this_boot`]).
pub fn take_holder() -> Option<Holder> {
    take(|m| m.holder.take())
}

/// The reflection services made ahead.
pub fn take_reflection() -> Option<tonic::service::Routes> {
    take(|m| m.reflection.take())
}
