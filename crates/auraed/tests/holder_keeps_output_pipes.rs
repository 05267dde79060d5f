//! The holder keeps the read ends of output pipes (host tier: root, for `pidfd_getfd`).
//! The real auraed binary runs in holder mode; this test plays auraed:
//! - without a holder, the last read end closing makes a write fail with EPIPE (SIGPIPE
//!   for a workload that does not ignore it);
//! - a read end handed to the holder survives its closing here *and* the end of the
//!   control channel (auraed killed): the write succeeds, the holder stays;
//! - a restarted auraed takes the read end back by number (`reclaim`) and reads what was
//!   written while it was away; a released number is closed in the holder;
//! - a number released and reused for another pipe (the kernel gives the lowest free
//!   number) is neither taken back nor released as the first pipe: the recorded identity
//!   (device, inode) tells them apart;
//! - a holder that holds nothing exits when the channel ends;
//! - `retire` kills the holder through its pidfd and nothing is left.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    io::{ErrorKind, Read, Write},
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use aurae_sys::ExitStatus;
use aurae_testkit::tier::{self, Tier};
use auraed::{
    reaper::Reaper,
    workload::holder::{Holder, ProcRef, reclaim, retire},
};

fn pipe() -> (OwnedFd, std::fs::File) {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    (r, std::fs::File::from(w))
}

#[test]
fn holder_keeps_output_pipes() {
    if !tier::check("holder_keeps_output_pipes", Tier::Host, tier::needs_root()) {
        return;
    }
    let kib: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();

    // Without a holder: the last read end gone, a write is EPIPE.
    let (r, mut w) = pipe();
    drop(r);
    assert_eq!(w.write(&kib).unwrap_err().kind(), ErrorKind::BrokenPipe);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let reaper = Arc::new(Reaper::default());
    rt.spawn(reaper.clone().run());
    let binary = std::fs::File::open(env!("CARGO_BIN_EXE_auraed")).unwrap();
    let holder = Holder::start_from(binary.as_fd(), &reaper).unwrap();
    let proc: ProcRef = holder.proc();
    let exit = holder.take_exit().unwrap();
    assert_eq!(
        std::fs::read(format!("/proc/{}/comm", proc.pid)).unwrap(),
        b"aurae-holder\n"
    );

    // A holder that holds nothing exits when its control channel ends.
    let idle = Holder::start_from(binary.as_fd(), &reaper).unwrap();
    let idle_exit = idle.take_exit().unwrap();
    drop(idle);
    let status = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), idle_exit).await })
        .expect("an idle holder exits")
        .unwrap();
    assert_eq!(status, ExitStatus::Code(0));

    // Release closes the holder's copy: once ours is gone too, writes are EPIPE again.
    let (rb, mut wb) = pipe();
    let held_b = holder.hold_all(&[&rb]).unwrap();
    assert_eq!(held_b.fds.len(), 1);
    holder.release_held(&held_b).unwrap();
    assert!(reclaim(&proc, &held_b.fds).unwrap()[0].is_none());
    drop(rb);
    assert_eq!(wb.write(&kib).unwrap_err().kind(), ErrorKind::BrokenPipe);

    // The attack: B's number, released, now holds another workload's pipe C. B's record
    // takes nothing back, and releasing B again leaves C held.
    let (rc, mut wc) = pipe();
    let held_c = holder.hold_all(&[&rc]).unwrap();
    assert_eq!(
        held_c.fds, held_b.fds,
        "the kernel reuses the lowest free number"
    );
    assert!(
        held_b.reclaim(true).unwrap()[0].is_none(),
        "another pipe under B's number is not B's"
    );
    holder.release_held(&held_b).unwrap();
    drop(rc);
    wc.write_all(&kib).expect("C is still held: no EPIPE");
    let c_back = held_c.reclaim(true).unwrap().into_iter().next().unwrap();
    assert!(c_back.is_some(), "C's own record takes it back");
    // A record without identities (from before they were kept) is taken at its word only
    // while its workload runs (its ends were not released), and only for a pipe or socket.
    let unverified = auraed::workload::holder::HeldOutput {
        ids: Vec::new(),
        ..held_c.clone()
    };
    assert!(unverified.reclaim(false).unwrap()[0].is_none());
    assert!(unverified.reclaim(true).unwrap()[0].is_some());
    holder.release_held(&held_c).unwrap();
    drop((c_back, wc));

    // Held: our read end closes, then the control channel (auraed killed).
    let (ra, mut wa) = pipe();
    let na = holder.hold(&[ra.as_fd()]).unwrap();
    assert_eq!(na.len(), 1);
    drop(ra);
    drop(holder);
    std::thread::sleep(Duration::from_millis(200));
    wa.write_all(&kib).expect("a held read end: no EPIPE");
    assert!(
        proc.open().unwrap().is_some(),
        "the holder outlives the end of its control channel"
    );

    // The next auraed takes it back by number and reads what was written meanwhile.
    let got = reclaim(&proc, &[na[0], 1000]).unwrap();
    assert!(got[1].is_none(), "a number that is not open there");
    let mut back = std::fs::File::from(got.into_iter().next().unwrap().unwrap());
    drop(wa);
    let mut read = Vec::new();
    back.read_to_end(&mut read).unwrap();
    assert_eq!(read, kib);

    // Retired through its pidfd: killed, reaped, gone.
    assert!(retire(&proc).unwrap());
    let status = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), exit).await })
        .expect("the holder was reaped")
        .unwrap();
    assert_eq!(status, ExitStatus::Signal(nix::libc::SIGKILL));
    assert!(proc.open().unwrap().is_none());
    assert!(!std::path::Path::new(&format!("/proc/{}", proc.pid)).exists());
    assert!(!retire(&proc).unwrap());
}
