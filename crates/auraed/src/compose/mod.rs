//! Operations made of several steps over the workload layers: RunCell today (a cell and
//! its container; nothing stays behind on failure), Spawn and RunPod next. Adapters call
//! these; they never call each other.

pub mod run_cell;
