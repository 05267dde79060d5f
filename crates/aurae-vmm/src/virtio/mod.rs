//! virtio over MMIO (virtio 1.x, register layout version 2) and the devices behind it:
//! [`block::Block`] (a file-backed disk), [`net::Net`] (a TAP device) and
//! [`console::Console`] (an output-only console).
//!
//! A [`MmioTransport`] owns one device, its split virtqueues (`virtio-queue`) and the
//! eventfd registered with KVM as the device's irqfd. The vCPU thread that takes an MMIO
//! exit inside a device's window calls [`MmioTransport::read`] / [`MmioTransport::write`]
//! under the transport's mutex; a write to `QueueNotify` processes that queue right there
//! (on the vCPU thread) and raises the interrupt if used buffers were added. The only
//! other thread that touches a transport is the network device's RX thread.
//!
//! Guest input is never trusted: register accesses of the wrong width are ignored,
//! queue setup is checked by `Queue::is_valid` before the device runs, and every
//! descriptor chain is bounds-checked by `virtio-queue` (`Reader`/`Writer` refuse
//! addresses outside guest memory; chains are length-limited).

pub mod block;
pub mod console;
pub mod net;

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::layout::{MMIO_DEVICE_SIZE, MMIO_DEVICES_START};

/// `virt` in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The register layout version implemented (virtio 1.x "modern").
pub const MMIO_VERSION: u32 = 2;
/// The vendor id reported (`AURA`).
pub const VENDOR_ID: u32 = 0x4155_5241;

/// Feature bit 32: virtio 1.x. Every device offers it and the driver must accept it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits.
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready; the device may run.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Register offsets in a device's window.
pub mod reg {
    #![allow(missing_docs)]
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// InterruptStatus bit 0: the device used a buffer.
pub const INT_USED_RING: u32 = 1;

/// A virtio device model behind a [`MmioTransport`].
pub trait VirtioDevice: Send {
    /// The virtio device id (1 = net, 2 = block, 3 = console).
    fn device_type(&self) -> u32;
    /// The feature bits offered ([`VIRTIO_F_VERSION_1`] included).
    fn features(&self) -> u64;
    /// The largest size of each queue (one entry per queue).
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device configuration space at `offset`; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Processes queue `index` after a notification (or, for the network RX queue, when
    /// the TAP has frames). Returns whether the driver must be interrupted.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
    /// The driver reset the device.
    fn reset(&mut self) {}
}

/// Copies `src[offset..]` into `data`, zero-filling what lies past the end.
pub(crate) fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(tail) = src.get(start..) {
        let n = tail.len().min(data.len());
        data[..n].copy_from_slice(&tail[..n]);
    }
}

/// One virtio-mmio device: registers, queues, interrupt.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemoryMmap>,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    irq: EventFd,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("interrupt_status", &self.interrupt_status)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// A transport for `device`, interrupting through `irq` (an eventfd registered with
    /// KVM as an irqfd).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Arc<GuestMemoryMmap>,
        irq: EventFd,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            irq,
        })
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The interrupt eventfd.
    pub fn irq(&self) -> &EventFd {
        &self.irq
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn running(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::DEVICE_NEEDS_RESET == 0
    }

    /// An MMIO read at `offset` in the device's window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 {
            return;
        }
        let q = self.queues.get(self.queue_select as usize);
        let v: u32 = match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// An MMIO write at `offset` in the device's window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            // Configuration space is read-only for both devices here.
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let configurable = self.status & status::FEATURES_OK != 0 && !self.running();
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = v,
            // Features may be written between DRIVER and FEATURES_OK only.
            reg::DRIVER_FEATURES
                if self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0 =>
            {
                match self.driver_features_select {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_select = v,
            reg::QUEUE_NUM if configurable => {
                if let Some(q) = self.selected_queue().filter(|q| !q.ready()) {
                    q.set_size(v as u16);
                }
            }
            reg::QUEUE_READY if configurable => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH
                if configurable =>
            {
                if let Some(q) = self.selected_queue().filter(|q| !q.ready()) {
                    match offset {
                        reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
                        reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
                        reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(v), None),
                        reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(v)),
                        reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(v), None),
                        _ => q.set_used_ring_address(None, Some(v)),
                    }
                }
            }
            reg::QUEUE_NOTIFY => self.notify(v as usize),
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => self.set_status(v),
            _ => {}
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let new = v & !self.status;
        let mut v = v;
        if new & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                // Leave FEATURES_OK clear: the driver reads it back and gives up.
                v &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 {
            let mem = &*self.mem;
            let valid = self.status & status::FEATURES_OK != 0
                && self.queues.iter().all(|q| !q.ready() || q.is_valid(mem));
            if !valid {
                v |= status::DEVICE_NEEDS_RESET;
            }
        }
        self.status = v;
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.device.reset();
    }

    /// The registers and queues, for a snapshot.
    pub fn state(&self) -> crate::snapshot::TransportState {
        crate::snapshot::TransportState {
            device_type: self.device.device_type(),
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            status: self.status,
            interrupt_status: self.interrupt_status,
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    crate::snapshot::QueueState {
                        max_size: s.max_size,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                        event_idx_enabled: s.event_idx_enabled,
                        size: s.size,
                        ready: s.ready,
                        desc_table: s.desc_table,
                        avail_ring: s.avail_ring,
                        used_ring: s.used_ring,
                    }
                })
                .collect(),
        }
    }

    /// Puts back the registers and queues a snapshot recorded, on a transport rebuilt for
    /// the same kind of device (checked: device type, queue count and sizes). A pending
    /// interrupt is raised again.
    pub fn restore(&mut self, s: &crate::snapshot::TransportState) -> Result<(), String> {
        let here = self.device.device_type();
        if s.device_type != here {
            return Err(format!(
                "the snapshot has device type {} here, the VM has {here}",
                s.device_type
            ));
        }
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "device type {here}: {} queues in the snapshot, {} here",
                s.queues.len(),
                self.queues.len()
            ));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (q, now) in s.queues.iter().zip(&self.queues) {
            if q.max_size != now.max_size() {
                return Err(format!(
                    "device type {here}: queue of {} entries in the snapshot, {} here",
                    q.max_size,
                    now.max_size()
                ));
            }
            let state = virtio_queue::QueueState {
                max_size: q.max_size,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx_enabled,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            };
            queues.push(
                Queue::try_from(state).map_err(|e| format!("device type {here}: a queue: {e}"))?,
            );
        }
        self.queues = queues;
        self.queue_select = s.queue_select;
        self.device_features_select = s.device_features_select;
        self.driver_features_select = s.driver_features_select;
        self.driver_features = s.driver_features;
        self.status = s.status;
        self.interrupt_status = s.interrupt_status;
        if self.interrupt_status != 0 {
            let _ = self.irq.write(1);
        }
        Ok(())
    }

    /// Processes queue `index` if the device runs and the queue is ready; interrupts the
    /// driver if the device asks for it.
    pub fn notify(&mut self, index: usize) {
        if !self.running() {
            return;
        }
        let Some(q) = self.queues.get_mut(index).filter(|q| q.ready()) else {
            return;
        };
        if self.device.process_queue(index, q, &self.mem) {
            self.interrupt_status |= INT_USED_RING;
            // An eventfd write fails only when its counter would overflow, which means an
            // interrupt is pending anyway.
            let _ = self.irq.write(1);
        }
    }
}

/// The virtio-mmio devices, by window.
#[derive(Debug, Default)]
pub struct MmioBus {
    devices: Vec<Arc<Mutex<MmioTransport>>>,
}

impl MmioBus {
    /// The bus with devices at [`crate::layout::mmio_device_addr`]`(0..)`.
    pub fn new(devices: Vec<Arc<Mutex<MmioTransport>>>) -> Self {
        Self { devices }
    }

    /// The devices.
    pub fn devices(&self) -> &[Arc<Mutex<MmioTransport>>] {
        &self.devices
    }

    fn find(&self, addr: u64) -> Option<(&Arc<Mutex<MmioTransport>>, u64)> {
        let rel = addr.checked_sub(MMIO_DEVICES_START)?;
        let dev = self
            .devices
            .get(usize::try_from(rel / MMIO_DEVICE_SIZE).ok()?)?;
        Some((dev, rel % MMIO_DEVICE_SIZE))
    }

    /// An MMIO read; addresses outside every device read as all ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((dev, off)) => match dev.lock() {
                Ok(d) => d.read(off, data),
                Err(_) => data.fill(0xff),
            },
            None => data.fill(0xff),
        }
    }

    /// An MMIO write; addresses outside every device are ignored.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((dev, off)) = self.find(addr)
            && let Ok(mut d) = dev.lock()
        {
            d.write(off, data);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use vm_memory::GuestAddress;

    use super::*;

    /// Split-ring descriptor flags: another descriptor follows; the device writes here.
    pub(crate) const F_NEXT: u16 = 1;
    pub(crate) const F_WRITE: u16 = 2;

    /// A descriptor for `MockSplitQueue::add_desc_chains`.
    pub(crate) fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// A device with one queue that uses every chain it gets (length 0).
    struct Echo {
        sizes: [u16; 1],
        resets: usize,
    }

    impl VirtioDevice for Echo {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&[1, 2, 3, 4], offset, data);
        }
        fn process_queue(&mut self, _: usize, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
            let mut any = false;
            while let Some(c) = q.pop_descriptor_chain(mem) {
                any |= q.add_used(mem, c.head_index(), 0).is_ok();
            }
            any
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    pub(crate) fn mem() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap())
    }

    fn r32(t: &MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w32(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn transport() -> MmioTransport {
        let dev = Echo {
            sizes: [16],
            resets: 0,
        };
        MmioTransport::new(
            Box::new(dev),
            mem(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        )
        .unwrap()
    }

    /// Drives the transport as Linux's virtio_mmio does, with the rings at 0x1000..
    fn bring_up(t: &mut MmioTransport) {
        w32(t, reg::STATUS, status::ACKNOWLEDGE);
        w32(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w32(t, reg::DRIVER_FEATURES_SEL, 1);
        w32(t, reg::DRIVER_FEATURES, 1);
        w32(t, reg::DRIVER_FEATURES_SEL, 0);
        w32(t, reg::DRIVER_FEATURES, 1);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        w32(t, reg::STATUS, s);
        assert_eq!(r32(t, reg::STATUS), s);
        w32(t, reg::QUEUE_SEL, 0);
        assert_eq!(r32(t, reg::QUEUE_NUM_MAX), 16);
        w32(t, reg::QUEUE_NUM, 16);
        w32(t, reg::QUEUE_DESC_LOW, 0x1000);
        w32(t, reg::QUEUE_DRIVER_LOW, 0x2000);
        w32(t, reg::QUEUE_DEVICE_LOW, 0x3000);
        w32(t, reg::QUEUE_READY, 1);
        w32(t, reg::STATUS, s | status::DRIVER_OK);
    }

    #[test]
    fn identification_registers() {
        let t = transport();
        assert_eq!(r32(&t, reg::MAGIC), 0x7472_6976);
        assert_eq!(r32(&t, reg::VERSION), 2);
        assert_eq!(r32(&t, reg::DEVICE_ID), 42);
        assert_eq!(r32(&t, reg::DEVICE_FEATURES), 1);
        let mut t = t;
        w32(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r32(&t, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        // Config space, any width; past its end reads 0.
        let mut b = [0u8; 2];
        t.read(reg::CONFIG + 2, &mut b);
        assert_eq!(b, [3, 4]);
        t.read(reg::CONFIG + 3, &mut b);
        assert_eq!(b, [4, 0]);
        // Registers only answer 32-bit accesses.
        t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let mut t = transport();
        w32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w32(&mut t, reg::DRIVER_FEATURES, 1);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        w32(&mut t, reg::STATUS, s);
        assert_eq!(r32(&t, reg::STATUS) & status::FEATURES_OK, 0);
        // A feature the device does not offer is refused too.
        w32(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w32(&mut t, reg::DRIVER_FEATURES, 3);
        w32(&mut t, reg::STATUS, s);
        assert_eq!(r32(&t, reg::STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn notify_processes_the_queue_and_interrupts() {
        let mut t = transport();
        bring_up(&mut t);
        assert_eq!(r32(&t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        // One chain of one descriptor at index 0: desc table at 0x1000, avail at 0x2000.
        let mem = Arc::clone(&t.mem);
        use vm_memory::Bytes;
        mem.write_obj(0x10_0000u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(16u32, GuestAddress(0x1008)).unwrap();
        mem.write_obj(0u16, GuestAddress(0x2004)).unwrap(); // ring[0] = 0
        mem.write_obj(1u16, GuestAddress(0x2002)).unwrap(); // avail idx = 1
        w32(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap(),
            1,
            "used idx"
        );
        assert_eq!(r32(&t, reg::INTERRUPT_STATUS), INT_USED_RING);
        assert_eq!(t.irq().read().unwrap(), 1);
        w32(&mut t, reg::INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(r32(&t, reg::INTERRUPT_STATUS), 0);
        // Queue setup cannot change while the device runs.
        w32(&mut t, reg::QUEUE_DESC_LOW, 0x5000);
        assert_eq!(t.queues[0].desc_table(), 0x1000);
        // A notification for a queue that does not exist is ignored.
        w32(&mut t, reg::QUEUE_NOTIFY, 7);
        // Reset.
        w32(&mut t, reg::STATUS, 0);
        assert_eq!(r32(&t, reg::STATUS), 0);
        assert_eq!(r32(&t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn invalid_rings_need_a_reset() {
        let mut t = transport();
        w32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w32(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w32(&mut t, reg::DRIVER_FEATURES, 1);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        w32(&mut t, reg::STATUS, s);
        w32(&mut t, reg::QUEUE_NUM, 16);
        // Descriptor table past the end of guest memory.
        w32(&mut t, reg::QUEUE_DESC_LOW, 0xffff_0000);
        w32(&mut t, reg::QUEUE_DRIVER_LOW, 0x2000);
        w32(&mut t, reg::QUEUE_DEVICE_LOW, 0x3000);
        w32(&mut t, reg::QUEUE_READY, 1);
        w32(&mut t, reg::STATUS, s | status::DRIVER_OK);
        assert_ne!(r32(&t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        // The device does not run: a notify does nothing (and does not panic).
        w32(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(r32(&t, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn bus_dispatches_by_address() {
        let bus = MmioBus::new(vec![Arc::new(Mutex::new(transport()))]);
        let mut d = [0u8; 4];
        bus.read(MMIO_DEVICES_START, &mut d);
        assert_eq!(u32::from_le_bytes(d), MMIO_MAGIC);
        bus.read(MMIO_DEVICES_START + MMIO_DEVICE_SIZE, &mut d);
        assert_eq!(d, [0xff; 4]);
        bus.read(0x1000, &mut d);
        assert_eq!(d, [0xff; 4]);
        bus.write(MMIO_DEVICES_START + reg::STATUS, &1u32.to_le_bytes());
        bus.read(MMIO_DEVICES_START + reg::STATUS, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);
    }
}
