//! virtio-console, output only: the guest's `hvc0` (Linux's `virtio_console`), written
//! to the same sink as the serial console, a whole buffer per notification.
//!
//! Why it exists: every byte a guest writes to the 16550 UART is a port-I/O exit. Under
//! nested virtualisation an exit costs a round trip through the level below, and a
//! microVM instance's auraed writes its log (an audit line per call) to its console: on
//! this fleet's nested setup that was ~0.2 ms per byte. Here a `write(2)` of a log line
//! is one `QueueNotify` exit.
//!
//! No feature beyond `VIRTIO_F_VERSION_1` is offered (no size, no multiport, no
//! emergency write): the driver makes one console port. Queues: 0 = receive (never
//! filled: the console takes no input; the UART does), 1 = transmit, processed on the
//! vCPU thread that notifies. A chain's device-readable bytes are written in order; a
//! write-only descriptor in a transmit chain, or a chain longer than [`MAX_CHAIN`], is
//! dropped (counted); a sink that fails is counted and the buffer still returned — the
//! guest never waits on the host's log.

use std::io::{Read, Write};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{VIRTIO_F_VERSION_1, VirtioDevice, read_config_bytes};
use crate::config::SerialSink;

/// virtio device id of a console.
pub const DEVICE_TYPE: u32 = 3;
/// Each queue's size.
pub const QUEUE_SIZE: u16 = 64;
/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
/// The most bytes taken from one transmit chain (Linux sends at most a page).
pub const MAX_CHAIN: usize = 64 << 10;

/// What the device counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleCounters {
    /// Bytes written to the sink.
    pub bytes: u64,
    /// Transmit buffers the guest handed over.
    pub buffers: u64,
    /// Buffers not written (malformed chain, too long, the sink failed).
    pub dropped: u64,
}

/// An output-only virtio console.
pub struct Console {
    out: SerialSink,
    sizes: [u16; 2],
    buf: Vec<u8>,
    counters: ConsoleCounters,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console writing what the guest sends to `out`.
    pub fn new(out: SerialSink) -> Self {
        Self {
            out,
            sizes: [QUEUE_SIZE; 2],
            // Made here, at its largest: growing it on the (filtered) vCPU thread would
            // allocate there.
            buf: Vec::with_capacity(MAX_CHAIN),
            counters: ConsoleCounters::default(),
        }
    }

    /// What was counted so far.
    pub fn counters(&self) -> ConsoleCounters {
        self.counters
    }

    fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            self.counters.buffers += 1;
            let readable_only = chain.clone().all(|d| !d.is_write_only());
            let written = match chain.reader::<()>(mem) {
                Ok(mut r) if readable_only && r.available_bytes() <= MAX_CHAIN => {
                    let n = r.available_bytes();
                    self.buf.resize(n, 0);
                    r.read_exact(&mut self.buf[..n]).is_ok()
                        && self.out.write_all(&self.buf[..n]).is_ok()
                        && {
                            self.counters.bytes += n as u64;
                            true
                        }
                }
                _ => false,
            };
            if !written {
                self.counters.dropped += 1;
            }
            if queue.add_used(mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        if used {
            let _ = self.out.flush();
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: read only with features not offered.
        read_config_bytes(&[0u8; 12], offset, data);
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        match index {
            TX_QUEUE => self.process_tx(queue, mem),
            // The receive buffers the driver posts stay posted: no input comes this way.
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::tests::{F_NEXT, F_WRITE, desc};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from_raw_os_error(libc::EPIPE))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    #[test]
    fn identity_and_no_features_beyond_version_1() {
        let c = Console::new(Box::new(std::io::sink()));
        assert_eq!(c.device_type(), 3);
        assert_eq!(c.features(), VIRTIO_F_VERSION_1);
        assert_eq!(c.queue_max_sizes(), &[64, 64]);
        let mut cfg = [0xffu8; 12];
        c.read_config(0, &mut cfg);
        assert_eq!(cfg, [0; 12]);
    }

    #[test]
    fn transmit_writes_each_chain_in_order_and_returns_it() {
        let mem = mem();
        let sink = Sink::default();
        let mut c = Console::new(Box::new(sink.clone()));
        mem.write_slice(b"hello, ", GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(b"world\n", GuestAddress(0x20_0000))
            .unwrap();
        mem.write_slice(b"two\n", GuestAddress(0x30_0000)).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        // One chain of two descriptors, then a chain of one.
        vq.add_desc_chains(
            &[
                desc(0x10_0000, 7, F_NEXT, 1),
                desc(0x20_0000, 6, 0, 0),
                desc(0x30_0000, 4, 0, 0),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(c.process_queue(TX_QUEUE, &mut q, &mem));
        assert_eq!(&sink.0.lock().unwrap()[..], b"hello, world\ntwo\n");
        assert_eq!(
            c.counters(),
            ConsoleCounters {
                bytes: 17,
                buffers: 2,
                dropped: 0
            }
        );
        // Both returned to the guest.
        assert_eq!(vq.used().idx().load(), 2);
        // The receive queue takes nothing and asks for no interrupt.
        let mut rx: Queue = MockSplitQueue::new(&mem, 16).create_queue().unwrap();
        assert!(!c.process_queue(RX_QUEUE, &mut rx, &mem));
    }

    #[test]
    fn malformed_chains_and_a_failing_sink_are_dropped_and_returned() {
        let mem = mem();
        let sink = Sink::default();
        let mut c = Console::new(Box::new(sink.clone()));
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(
            &[
                // A write-only descriptor in a transmit chain.
                desc(0x10_0000, 8, F_WRITE, 0),
                // Past the end of guest memory.
                desc(0xfff_0000, 8, 0, 0),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(c.process_queue(TX_QUEUE, &mut q, &mem));
        assert!(sink.0.lock().unwrap().is_empty());
        assert_eq!(c.counters().dropped, 2);
        assert_eq!(vq.used().idx().load(), 2);

        let mut broken = Console::new(Box::new(Broken));
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x10_0000, 8, 0, 0)], 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(broken.process_queue(TX_QUEUE, &mut q, &mem));
        assert_eq!(broken.counters().dropped, 1);
        assert_eq!(vq.used().idx().load(), 1, "the guest gets its buffer back");
    }
}
