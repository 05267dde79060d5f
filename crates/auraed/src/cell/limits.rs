//! A cell's limits as cgroup v2 interface files (see [`crate::workload::limits`]).

pub use crate::workload::limits::{LimitWrite, check_controllers, limit_writes, own_writes};
