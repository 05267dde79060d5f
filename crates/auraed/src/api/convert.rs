//! Domain state → the API's messages: the one place workload state becomes protobuf.

use aurae_proto::runtime::v0 as pb;

use crate::{
    cell::{Cell, CellStats, Limits},
    executable::{Executable, Exit},
    vm::Vm,
    workload::Phase,
};

pub fn phase(p: Phase) -> i32 {
    (match p {
        Phase::Starting => pb::Phase::Starting,
        Phase::Running => pb::Phase::Running,
        Phase::Stopping => pb::Phase::Stopping,
        Phase::Exited => pb::Phase::Exited,
        Phase::Failed => pb::Phase::Failed,
    }) as i32
}

pub fn exit(e: &Exit) -> pb::ExitStatus {
    crate::events::exit_status(e.status, e.oom_killed, e.at)
}

pub fn executable(e: &Executable) -> pb::ExecutableStatus {
    let s = e.state.borrow().clone();
    pb::ExecutableStatus {
        cell: e.cell.to_string(),
        name: e.name.to_string(),
        phase: phase(s.phase),
        pid: if s.exit.is_some() { 0 } else { e.pid },
        exit: s.exit.as_ref().map(exit),
        started_at: Some(e.started_at.into()),
        argv: e.argv.clone(),
        // Only the fact and the count: the error names host paths (in auraed's log).
        message: match e.log.write_failures() {
            0 => String::new(),
            n => format!(
                "output is not reaching the log file ({n} failed writes; the cause is in auraed's log)"
            ),
        },
        image_digest: e.image_digest.clone().unwrap_or_default(),
        output: Vec::new(),
        limits: e.limits().as_ref().map(limits),
    }
}

/// The output `e`'s log keeps in memory, as the chunks Logs would stream from offset 0
/// (the reply to a one-call run with `run.output`).
pub fn output(e: &Executable) -> Vec<pb::LogChunk> {
    let mut next = 0;
    e.log
        .read_from(0)
        .0
        .into_iter()
        .map(|c| log_chunk(c, &mut next))
        .collect()
}

/// One chunk of a log read from `next` (moved to the chunk's end): its `dropped` is the
/// gap between the two, the bytes of the log this reader will not get — cut from memory
/// before they were read, or never kept there (reading them back from the log file
/// failed, reported as a log failure) —, counted once, on the chunk after the gap.
pub fn log_chunk(c: crate::workload::log::Chunk, next: &mut u64) -> pb::LogChunk {
    let dropped = c.offset.saturating_sub(*next);
    *next = (*next).max(c.offset + c.data.len() as u64);
    pb::LogChunk {
        offset: c.offset,
        stream: match c.stream {
            crate::workload::log::Stream::Stdout => pb::LogStream::Stdout,
            crate::workload::log::Stream::Stderr => pb::LogStream::Stderr,
        } as i32,
        data: c.data,
        at: Some(c.at.into()),
        dropped,
    }
}

pub fn cell(c: &Cell) -> pb::CellStatus {
    let (p, message) = c.phase_and_message();
    let exes = c.executables();
    let n = &c.spec.namespaces;
    pb::CellStatus {
        name: c.spec.name.to_string(),
        phase: phase(p),
        limits: Some(limits(&c.spec.limits)),
        namespaces: Some(pb::CellNamespaces {
            share_host_pid: n.share_host_pid,
            share_host_net: n.share_host_net,
            share_host_ipc: n.share_host_ipc,
            share_host_uts: n.share_host_uts,
            share_host_mount: n.share_host_mount,
            share_host_cgroup: n.share_host_cgroup,
            user_namespace: n.user_namespace,
        }),
        executables: exes.iter().map(|e| executable(e)).collect(),
        // The cell's first container's image (RunCell starts it with the cell).
        image_digest: exes
            .iter()
            .find_map(|e| e.image_digest.clone())
            .unwrap_or_default(),
        created_at: Some(c.created_at.into()),
        message,
        devices: Some(pb::CellDevices {
            kvm: c.spec.devices.kvm,
        }),
    }
}

pub fn stats(s: &CellStats) -> pb::ResourceStats {
    pb::ResourceStats {
        cpu_usage_usec: s.cpu_usage_usec,
        cpu_user_usec: s.cpu_user_usec,
        cpu_system_usec: s.cpu_system_usec,
        cpu_nr_throttled: s.cpu_nr_throttled,
        cpu_throttled_usec: s.cpu_throttled_usec,
        memory_current_bytes: s.memory_current_bytes,
        memory_peak_bytes: s.memory_peak_bytes,
        pids_current: s.pids_current,
        oom_kills: s.oom_kills,
        io_read_bytes: s.io_read_bytes,
        io_write_bytes: s.io_write_bytes,
    }
}

pub fn vm(v: &Vm) -> pb::VirtualMachineStatus {
    let s = v.state.borrow().clone();
    pb::VirtualMachineStatus {
        name: v.spec.name.to_string(),
        phase: phase(s.phase),
        vmm_pid: if s.process.is_some() { 0 } else { v.pid },
        boot_time: s
            .boot_time
            .and_then(|d| prost_types::Duration::try_from(d).ok()),
        addresses: v.addresses(),
        exit: s
            .process
            .map(|(st, at)| crate::events::exit_status(st, false, at)),
        started_at: Some(v.started_at.into()),
        message: s.message,
        snapshot: v
            .spec
            .snapshot
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        restore_time: s
            .restore_time
            .and_then(|d| prost_types::Duration::try_from(d).ok()),
    }
}

pub fn vm_snapshot(i: &crate::vm::snapshots::SnapshotInfo) -> pb::VirtualMachineSnapshot {
    pb::VirtualMachineSnapshot {
        name: i.name.clone(),
        vm: i.vm.clone(),
        vcpus: i.vcpus,
        memory_bytes: i.memory_bytes,
        drives: u32::try_from(i.drives).unwrap_or(u32::MAX),
        interfaces: u32::try_from(i.interfaces).unwrap_or(u32::MAX),
        state_bytes: i.state_bytes,
        took: prost_types::Duration::try_from(std::time::Duration::from_nanos(i.took_ns)).ok(),
        created_at: Some(
            (std::time::UNIX_EPOCH + std::time::Duration::from_secs(i.created_unix_s)).into(),
        ),
        cpu_template: i.cpu_template.clone(),
    }
}

pub fn instance(i: &crate::instance::Instance) -> pb::InstanceStatus {
    let s = i.state.borrow().clone();
    let dur =
        |d: Option<std::time::Duration>| d.and_then(|d| prost_types::Duration::try_from(d).ok());
    pb::InstanceStatus {
        name: i.spec.name.to_string(),
        phase: phase(s.phase),
        isolation: match i.isolation {
            crate::instance::Isolation::VirtualMachine => pb::Isolation::VirtualMachine,
            crate::instance::Isolation::Cell => pb::Isolation::Cell,
        } as i32,
        spiffe_id: i.spiffe_id.to_string(),
        endpoint: i.endpoint().to_string(),
        started_at: Some(i.started_at.into()),
        exit: s
            .exited
            .map(|(st, at)| crate::events::exit_status(st, false, at)),
        message: s.message,
        isolation_reason: i.isolation_reason.clone(),
        boot_time: dur(s.boot_time),
        ready_time: dur(s.ready_time),
        svid_expires_at: s.svid_expires_at.map(Into::into),
        addresses: vec![i.addr.to_string(), i.addr6.to_string()],
        depth: i.depth,
        template: i.template.clone().unwrap_or_default(),
        boot_reason: i.boot_reason.clone(),
    }
}

/// A pod's status; its usage when the caller asked for it (Get) and got it.
pub fn pod(p: &crate::pod::Pod, usage: Option<&crate::pod::PodUsage>) -> pb::PodStatus {
    let s = p.state.borrow().clone();
    let mut message = s.message;
    if let Some(why) = usage.and_then(|u| u.cell_error.as_ref())
        && !matches!(s.phase, Phase::Exited | Phase::Failed)
    {
        message = format!("usage in the instance: {why}");
    }
    pb::PodStatus {
        name: p.name.to_string(),
        phase: phase(s.phase),
        instance: Some(instance(&p.instance)),
        cell: usage.and_then(|u| u.cell_status.clone()),
        endpoint: p.endpoint().map(|e| e.to_string()).unwrap_or_default(),
        message,
        image: p.image.clone(),
        container: p.container.to_string(),
        exit: s.exit,
        created_at: Some(p.created_at.into()),
        host_stats: usage.and_then(|u| u.host.as_ref()).map(stats),
        host_memory_max_bytes: usage.and_then(|u| u.host_memory_max).unwrap_or(0),
        cell_stats: usage.and_then(|u| u.cell),
    }
}

pub fn limits(l: &Limits) -> pb::CellLimits {
    pb::CellLimits {
        cpu_weight: l.cpu_weight,
        cpu_max: l.cpu_max.map(|c| pb::CpuMax {
            quota_us: c.quota_us.unwrap_or(0),
            period_us: c.period_us,
        }),
        cpuset_cpus: l.cpuset_cpus.clone().unwrap_or_default(),
        cpuset_mems: l.cpuset_mems.clone().unwrap_or_default(),
        memory_min_bytes: l.memory_min,
        memory_low_bytes: l.memory_low,
        memory_high_bytes: l.memory_high,
        memory_max_bytes: l.memory_max,
        memory_swap_max_bytes: l.memory_swap_max,
        pids_max: l.pids_max,
        io_weight: l.io_weight,
        io_max: l
            .io_max
            .iter()
            .map(|m| pb::IoMax {
                device: format!("{}:{}", m.major, m.minor),
                rbps: m.rbps.unwrap_or(0),
                wbps: m.wbps.unwrap_or(0),
                riops: m.riops.unwrap_or(0),
                wiops: m.wiops.unwrap_or(0),
            })
            .collect(),
        memory_oom_group: Some(l.memory_oom_group),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_has_its_wire_value() {
        assert_eq!(phase(Phase::Starting), pb::Phase::Starting as i32);
        assert_eq!(phase(Phase::Running), pb::Phase::Running as i32);
        assert_eq!(phase(Phase::Stopping), pb::Phase::Stopping as i32);
        assert_eq!(phase(Phase::Exited), pb::Phase::Exited as i32);
        assert_eq!(phase(Phase::Failed), pb::Phase::Failed as i32);
    }

    /// `dropped` is each gap before a chunk, once: the cut start of the memory, a hole in
    /// the middle (bytes that were not read back from the file), nothing between
    /// contiguous chunks — never the first gap repeated on every chunk of a read.
    #[test]
    fn each_gap_is_counted_once_on_the_chunk_after_it() {
        use crate::workload::log::{Chunk, Stream};
        let chunk = |offset: u64, len: usize| Chunk {
            offset,
            stream: Stream::Stdout,
            data: vec![b'x'; len],
            at: std::time::SystemTime::UNIX_EPOCH,
        };
        let mut next = 3;
        let got: Vec<(u64, u64)> = [chunk(10, 5), chunk(15, 5), chunk(30, 2), chunk(32, 1)]
            .into_iter()
            .map(|c| log_chunk(c, &mut next))
            .map(|c| (c.offset, c.dropped))
            .collect();
        assert_eq!(got, [(10, 7), (15, 0), (30, 10), (32, 0)]);
        assert_eq!(next, 33);
        // A chunk the reader is already past (never sent by a read, which cuts at its
        // position) counts nothing and does not move it back.
        let c = log_chunk(chunk(20, 4), &mut next);
        assert_eq!((c.dropped, next), (0, 33));
    }
}
