//! Operations made of several steps over the workload layers: RunCell (a cell and its
//! container or process; nothing stays behind on failure), RunPod (an instance, its image
//! and container, its port; the same rule) and the one-call run (run_to_end: wait for the
//! end, free what the call made). Adapters call these; they never call each other.

pub mod run_cell;
pub mod run_pod;
pub mod run_to_end;
