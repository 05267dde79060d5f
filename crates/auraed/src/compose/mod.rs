//! Operations made of several steps over the workload layers: RunCell today (a cell and
//! its container; nothing stays behind on failure) and RunPod (an instance, its image and
//! container, its port; the same rule). Adapters call
//! these; they never call each other.

pub mod run_cell;
pub mod run_pod;
