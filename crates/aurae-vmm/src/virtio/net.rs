//! virtio-net on a TAP device, with a userspace datapath (no vhost-net).
//!
//! The TAP is opened `IFF_TAP | IFF_NO_PI` **without** `IFF_VNET_HDR`: the guest's 12-byte
//! `virtio_net_hdr_v1` is stripped on TX and a zero header (`num_buffers` = 1) is
//! prepended on RX. No offload features are offered (no checksum offload, TSO or
//! mergeable buffers), so every frame is a plain Ethernet frame of at most the MTU.
//!
//! Features offered: `VIRTIO_F_VERSION_1`, `VIRTIO_NET_F_MAC`. Queues: 0 = RX, 1 = TX,
//! [`QUEUE_SIZE`] each. TX runs on the vCPU thread that writes `QueueNotify`; RX runs
//! when the TAP has frames (the VM's `net-rx` thread, see [`rx_loop`]) and when the
//! driver posts new RX buffers (a notify on queue 0). A frame that finds no RX buffer
//! stays in the TAP until the driver posts one. A frame larger than the buffer it lands
//! in, or a TX chain shorter than a header or longer than [`MAX_FRAME`], is dropped
//! (counted), never a panic.

use std::{
    fs::File,
    io::{self, Read, Write},
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::{
    epoll::{ControlOperation, Epoll, EpollEvent, EventSet},
    eventfd::EventFd,
};

use super::{MmioTransport, VIRTIO_F_VERSION_1, VirtioDevice, read_config_bytes};

/// virtio device id of a network device.
pub const DEVICE_TYPE: u32 = 1;
/// Each queue's size.
pub const QUEUE_SIZE: u16 = 256;
/// The RX queue's index.
pub const RX_QUEUE: usize = 0;
/// The TX queue's index.
pub const TX_QUEUE: usize = 1;
/// Feature: the configuration holds the MAC address.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// `virtio_net_hdr_v1` (virtio 1.x): flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers.
pub const NET_HDR_LEN: usize = 12;
/// Largest frame moved (a TAP never gives more than 64 KiB).
pub const MAX_FRAME: usize = 65535;

/// What the device counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames sent to the TAP.
    pub tx_frames: u64,
    /// Frames dropped (too large for the buffer, malformed chain, TAP error).
    pub dropped: u64,
}

/// A virtio-net device on a TAP (or, in tests, any datagram fd).
#[derive(Debug)]
pub struct Net {
    tap: File,
    config: [u8; 6],
    sizes: [u16; 2],
    frame: Vec<u8>,
    pending: Option<usize>,
    counters: NetCounters,
}

impl Net {
    /// A device on an open, non-blocking TAP (one frame per `read`/`write`).
    pub fn new(tap: File, mac: [u8; 6]) -> Self {
        Self::with_frame(tap, mac, vec![0u8; MAX_FRAME])
    }

    /// [`Net::new`] with its frame buffer made elsewhere ([`MAX_FRAME`] bytes, only ever
    /// read up to what was just written into it; one of another length is made again
    /// here). Never made lazily on a device thread: those run under seccomp filters
    /// without `mprotect`, which glibc needs to grow a thread's arena.
    pub fn with_frame(tap: File, mac: [u8; 6], frame: Vec<u8>) -> Self {
        let frame = if frame.len() == MAX_FRAME {
            frame
        } else {
            vec![0u8; MAX_FRAME]
        };
        Self {
            tap,
            config: mac,
            sizes: [QUEUE_SIZE, QUEUE_SIZE],
            frame,
            pending: None,
            counters: NetCounters::default(),
        }
    }

    /// The TAP.
    pub fn tap(&self) -> &File {
        &self.tap
    }

    /// Counters so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Moves frames from the TAP into RX buffers until one of them runs out.
    fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        loop {
            let len = match self.pending {
                Some(len) => len,
                None => match self.tap.read(&mut self.frame) {
                    Ok(0) => break,
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                },
            };
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // No buffer: keep the frame for the next notification.
                self.pending = Some(len);
                break;
            };
            self.pending = None;
            let head = chain.head_index();
            let written = match chain.writer::<()>(mem) {
                Ok(mut w) if w.available_bytes() >= NET_HDR_LEN + len => {
                    let mut hdr = [0u8; NET_HDR_LEN];
                    hdr[10] = 1; // num_buffers
                    if w.write_all(&hdr).is_ok() && w.write_all(&self.frame[..len]).is_ok() {
                        self.counters.rx_frames += 1;
                        w.bytes_written()
                    } else {
                        self.counters.dropped += 1;
                        0
                    }
                }
                _ => {
                    self.counters.dropped += 1;
                    0
                }
            };
            if queue.add_used(mem, head, written as u32).is_err() {
                break;
            }
            used = true;
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }

    /// Sends every frame the driver queued.
    fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match chain.reader::<()>(mem) {
                Ok(mut r)
                    if (NET_HDR_LEN..=NET_HDR_LEN + MAX_FRAME).contains(&r.available_bytes()) =>
                {
                    let len = r.available_bytes() - NET_HDR_LEN;
                    let mut hdr = [0u8; NET_HDR_LEN];
                    let ok = r.read_exact(&mut hdr).is_ok()
                        && r.read_exact(&mut self.frame[..len]).is_ok()
                        && self.tap.write(&self.frame[..len]).is_ok_and(|n| n == len);
                    if ok {
                        self.counters.tx_frames += 1;
                    } else {
                        self.counters.dropped += 1;
                    }
                }
                _ => self.counters.dropped += 1,
            }
            if queue.add_used(mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        match index {
            RX_QUEUE => self.process_rx(queue, mem),
            TX_QUEUE => self.process_tx(queue, mem),
            _ => false,
        }
    }

    fn reset(&mut self) {
        self.pending = None;
    }
}

const RX_TAP: u64 = 0;
const RX_STOP: u64 = 1;

/// The RX thread's epoll set: `tap` (edge-triggered input) and `stop`. Made before the
/// thread's seccomp filter is installed (which does not allow creating epoll sets).
pub fn rx_epoll(tap: &impl AsRawFd, stop: &EventFd) -> io::Result<Epoll> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        tap.as_raw_fd(),
        EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, RX_TAP),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, RX_STOP),
    )?;
    Ok(epoll)
}

/// The RX thread's loop: waits on `epoll` (from [`rx_epoll`]) for frames and processes
/// the RX queue; returns when the stop eventfd is written (or epoll fails).
pub fn rx_loop(transport: &Arc<Mutex<MmioTransport>>, epoll: &Epoll) -> io::Result<()> {
    let mut events = [EpollEvent::default(); 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            match ev.data() {
                RX_STOP => return Ok(()),
                _ => {
                    if let Ok(mut t) = transport.lock() {
                        t.notify(RX_QUEUE);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::tests::{F_NEXT, F_WRITE, desc};

    /// A datagram socket pair standing in for a TAP: (device end, "host" end).
    fn fake_tap() -> (File, File) {
        let (a, b): (OwnedFd, OwnedFd) = socketpair(
            AddressFamily::Unix,
            SockType::Datagram,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        (File::from(a), File::from(b))
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    const MAC: [u8; 6] = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];

    #[test]
    fn config_holds_the_mac() {
        let (dev, _) = fake_tap();
        let net = Net::new(dev, MAC);
        let mut m = [0u8; 6];
        net.read_config(0, &mut m);
        assert_eq!(m, MAC);
        assert_eq!(net.features(), VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
        assert_eq!(net.queue_max_sizes(), &[256, 256]);
    }

    #[test]
    fn tx_strips_the_header_and_sends_the_frame() {
        let mem = mem();
        let (dev, mut host) = fake_tap();
        let mut net = Net::new(dev, MAC);
        let frame: Vec<u8> = (0..60u8).collect();
        mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(&frame, GuestAddress(0x20_0000)).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        // Header and frame in separate descriptors.
        vq.add_desc_chains(
            &[
                desc(0x10_0000, NET_HDR_LEN as u32, F_NEXT, 1),
                desc(0x20_0000, 60, 0, 0),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(net.process_queue(TX_QUEUE, &mut q, &mem));
        let mut got = [0u8; 200];
        let n = host.read(&mut got).unwrap();
        assert_eq!(&got[..n], &frame[..]);
        assert_eq!(net.counters().tx_frames, 1);
    }

    #[test]
    fn tx_drops_a_chain_shorter_than_a_header() {
        let mem = mem();
        let (dev, mut host) = fake_tap();
        let mut net = Net::new(dev, MAC);
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x10_0000, 4, 0, 0)], 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(net.process_queue(TX_QUEUE, &mut q, &mem));
        assert_eq!(net.counters().dropped, 1);
        let mut got = [0u8; 16];
        assert_eq!(
            host.read(&mut got).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn rx_prepends_a_header_and_waits_for_buffers() {
        let mem = mem();
        let (dev, mut host) = fake_tap();
        let mut net = Net::new(dev, MAC);
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        let frame: Vec<u8> = (0..100u8).collect();
        host.write_all(&frame).unwrap();
        host.write_all(&frame[..50]).unwrap();
        // No buffers yet: nothing used, the frame is kept.
        assert!(!net.process_queue(RX_QUEUE, &mut q, &mem));
        assert_eq!(net.pending, Some(100));
        // One buffer: the first frame lands in it, the second waits.
        vq.add_desc_chains(&[desc(0x10_0000, 2048, F_WRITE, 0)], 0)
            .unwrap();
        assert!(net.process_queue(RX_QUEUE, &mut q, &mem));
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len() as usize, NET_HDR_LEN + 100);
        let mut got = vec![0u8; NET_HDR_LEN + 100];
        mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(got[10], 1, "num_buffers");
        assert_eq!(&got[NET_HDR_LEN..], &frame[..]);
        assert_eq!(net.pending, Some(50));
        // A buffer too small for the next frame: the frame is dropped, the buffer used.
        vq.add_desc_chains(&[desc(0x20_0000, 20, F_WRITE, 0)], 1)
            .unwrap();
        assert!(net.process_queue(RX_QUEUE, &mut q, &mem));
        assert_eq!(vq.used().ring().ref_at(1).unwrap().load().len(), 0);
        assert_eq!(
            net.counters(),
            NetCounters {
                rx_frames: 1,
                tx_frames: 0,
                dropped: 1
            }
        );
        assert_eq!(net.pending, None);
    }

    #[test]
    fn rx_loop_stops_on_request() {
        let (dev, _host) = fake_tap();
        let tap = dev.try_clone().unwrap();
        let transport = Arc::new(Mutex::new(
            MmioTransport::new(
                Box::new(Net::new(dev, MAC)),
                Arc::new(mem()),
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            )
            .unwrap(),
        ));
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let stop2 = stop.try_clone().unwrap();
        let epoll = rx_epoll(&tap, &stop2).unwrap();
        let t = std::thread::spawn(move || rx_loop(&transport, &epoll));
        std::thread::sleep(std::time::Duration::from_millis(20));
        stop.write(1).unwrap();
        t.join().unwrap().unwrap();
    }
}
