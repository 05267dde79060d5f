//! auraed: the Aurae daemon. PID 1 of a machine or microVM, or a daemon on a host, serving
//! one mTLS-authenticated gRPC API for executables, cells, VMs, instances and pods.
//!
//! Module map (one noun per module; see ARCHITECTURE.md):
//! - [`config`]: the `--config` file (auraed's options in TOML).
//! - [`server`]: listeners, TLS handshakes, connection limits, ordered shutdown.
//! - [`api`]: one thin adapter per gRPC service, the authorization layer, error mapping.
//! - [`identity`]: the authorization policy.
//! - [`spec`]: validated newtypes shared by the nouns.
//! - [`executable`], [`cell`], [`vm`], [`instance`], [`pod`]: the nouns, each with its
//!   validated request types in `spec.rs`.
//! - [`workload`]: the seam below cells, containers and VMs (cgroup tree, errors, host
//!   paths, output capture, supervision).
//! - [`container`]: an image as a process's root.
//! - [`store`]: the durable record of what auraed runs.
#![forbid(unsafe_code)]

pub mod api;
pub mod cell;
pub mod compose;
pub mod config;
pub mod container;
pub mod cri;
pub mod events;
pub mod executable;
pub mod identity;
pub mod image;
pub mod instance;
pub mod pid1;
pub mod pod;
pub mod reaper;
pub mod server;
pub mod spec;
pub mod store;
pub mod vm;
pub mod workload;
