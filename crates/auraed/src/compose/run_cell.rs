//! RunCell: allocate a cell, start its container (or plain process), free the cell if it
//! cannot start. The caller has authorized everything and resolved the container's plan.

use std::{sync::Arc, time::Instant};

use crate::{
    cell::{Cell, CellSpec, Cells, registry::InTask},
    container::{ContainerSpec, Plan},
    executable::{Executable, ExecutableSpec},
    spec::Label,
    workload::WorkloadError,
};

/// What the caller's grant allows the container (never from the request).
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    pub allow_new_privileges: bool,
    pub allow_mixed_cell: bool,
    /// The run call's `remove`: the whole cell goes once the workload has ended.
    pub free_on_exit: Option<crate::executable::FreeOnExit>,
}

/// What RunCell runs in its new cell.
#[derive(Debug)]
pub enum Workload {
    /// A container from an image (resolved as the plan).
    Container(ContainerSpec, Box<Plan>),
    /// A plain process (its `cell` is the new cell's name).
    Process(ExecutableSpec),
}

/// A new cell `cell` running `what`; the cell and its one executable. In the caller's own
/// task (`InTask`): nothing stops it between the allocation and the start.
pub async fn run_cell(
    cells: &Arc<Cells>,
    cell: CellSpec,
    what: Workload,
    options: Options,
    task: InTask,
) -> Result<(Arc<Cell>, Arc<Executable>), WorkloadError> {
    let name = cell.name.clone();
    let (exe, plan) = match what {
        Workload::Container(container, plan) => {
            let mut exe = ExecutableSpec {
                cell: name.clone(),
                name: Some(container_name(&container.image)),
                argv: Vec::new(),
                env: Vec::new(),
                working_dir: "/".into(),
                uid: None,
                gid: None,
                stdin: Vec::new(),
                allow_new_privileges: options.allow_new_privileges && !container.no_new_privileges,
                allow_mixed_cell: options.allow_mixed_cell,
                free_on_exit: options.free_on_exit,
                container: Some(container),
                interactive: Default::default(),
                limits: None,
            };
            exe.apply_plan(&plan);
            (exe, Some(*plan))
        }
        Workload::Process(mut exe) => {
            exe.cell = name.clone();
            exe.allow_new_privileges = options.allow_new_privileges;
            exe.allow_mixed_cell = options.allow_mixed_cell;
            exe.free_on_exit = options.free_on_exit;
            (exe, None)
        }
    };
    let t0 = Instant::now();
    let made = cells
        .allocate_for(cell, exe.container.is_some(), task)
        .await?;
    let t_alloc = t0.elapsed();
    // In this very cell: not one someone freed and allocated again under its name.
    let started = match cells.run_in(&made, exe, plan, task).await {
        Ok(e) => e,
        Err(e) => {
            // Nothing stays behind from a workload that could not start.
            if let Err(free) = cells.free_if_same(&made).await {
                tracing::warn!(cell = %name, "freeing after a failed RunCell: {free}");
            }
            return Err(e);
        }
    };
    tracing::debug!(
        cell = %name,
        allocate_us = t_alloc.as_micros() as u64,
        start_us = (t0.elapsed() - t_alloc).as_micros() as u64,
        "RunCell timings"
    );
    Ok((made, started))
}

/// The container's executable name in a RunCell cell: the image's last path component.
fn container_name(image: &str) -> Label {
    let last = image.rsplit('/').next().unwrap_or_default();
    Label::sanitized(
        last.split([':', '@']).next().unwrap_or_default(),
        63,
        "container",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names_come_from_the_image() {
        for (image, want) in [
            ("127.0.0.1:5000/aurae/busybox:v1", "busybox"),
            ("ghcr.io/x/My_App@sha256:abc", "my-app"),
            ("reg/---", "container"),
            ("reg/a.b.c:1", "a-b-c"),
        ] {
            assert_eq!(container_name(image).as_str(), want, "{image}");
        }
    }
}
