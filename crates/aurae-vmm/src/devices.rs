//! Port-I/O devices: the COM1 serial console (vm-superio's 16550 model), a minimal i8042
//! keyboard controller whose only job is the guest's reset request, and the boot-timer
//! port.
//!
//! | ports          | device                                                         |
//! |----------------|----------------------------------------------------------------|
//! | 0x3f8..=0x3ff  | COM1, IRQ 4 (an eventfd registered with KVM as an irqfd)        |
//! | 0x60, 0x64     | i8042 as a reset line: `0xfe` written to 0x64 = CPU reset ([`IoAction::Reset`]); reads as absent |
//! | 0x440          | boot timer: the first byte [`BOOT_TIMER_MAGIC`] written stamps  |
//! |                | the time since the VM started                                  |
//! | 0x600, 0x601   | ACPI sleep control / reset register and sleep status (FADT):   |
//! |                | S5 = [`IoAction::PowerOff`], reset value = [`IoAction::Reset`] |
//! | anything else  | reads return all ones (no device), writes are dropped          |

use std::{
    io::{self, Write as _},
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use vm_superio::{Serial, Trigger, serial::NoEvents};
use vmm_sys_util::eventfd::EventFd;

use crate::config::SerialSink;

/// COM1's first port.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// COM1's IRQ (GSI) on the PIC and IOAPIC.
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The i8042 status/command port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The boot-timer port.
pub const BOOT_TIMER_PORT: u16 = 0x440;
/// The byte a guest writes to [`BOOT_TIMER_PORT`] when it has booted (as Firecracker's
/// boot-timer device uses): e.g. `printf '\173' | dd of=/dev/port bs=1 seek=1088` from init.
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// What a port write asks of the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoAction {
    /// Nothing beyond the device's own state.
    None,
    /// The guest asked for a CPU reset (i8042 command 0xfe, or the ACPI reset register).
    Reset,
    /// The guest entered ACPI S5 (soft off) through the sleep control register.
    PowerOff,
}

/// The hardware-reduced ACPI power-management registers the FADT points at: sleep
/// control and reset share [`crate::acpi::ACPI_PM_PORT`], sleep status is the next port.
#[derive(Debug, Default)]
pub struct AcpiPm;

impl AcpiPm {
    /// A byte written to the sleep control / reset register.
    pub fn write(value: u8) -> IoAction {
        use crate::acpi::{ACPI_RESET_VALUE, S5_SLEEP_TYPE, SLEEP_ENABLE};
        if value == ACPI_RESET_VALUE {
            IoAction::Reset
        } else if value & SLEEP_ENABLE != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE {
            IoAction::PowerOff
        } else {
            IoAction::None
        }
    }
}

/// A vm-superio interrupt trigger backed by an eventfd (KVM injects the IRQ when written).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// A new non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self(EventFd::new(libc::EFD_NONBLOCK)?))
    }

    /// A second handle on the same eventfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }

    /// The eventfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The COM1 UART, writing the guest's output to a sink.
pub type SerialDevice = Serial<EventFdTrigger, NoEvents, SerialSink>;

/// A UART with a snapshot's registers (its pending interrupts raised again).
pub fn serial_from_regs(
    r: &crate::snapshot::SerialRegs,
    trigger: EventFdTrigger,
    out: SerialSink,
) -> Result<SerialDevice, String> {
    let [dll, dlm, ier, iir, lcr, lsr, mcr, msr, scr] = r.regs;
    let st = vm_superio::serial::SerialState {
        baud_divisor_low: dll,
        baud_divisor_high: dlm,
        interrupt_enable: ier,
        interrupt_identification: iir,
        line_control: lcr,
        line_status: lsr,
        modem_control: mcr,
        modem_status: msr,
        scratch: scr,
        in_buffer: r.in_buffer.clone(),
    };
    Serial::from_state(&st, trigger, NoEvents, out).map_err(|e| format!("serial port: {e:?}"))
}

/// i8042 status bit 0: output buffer full (a byte waits at 0x60).
const I8042_STATUS_OBF: u8 = 0x01;
/// i8042 status bit 2: system flag (self-test passed).
const I8042_STATUS_SYS: u8 = 0x04;
/// i8042 command: pulse the CPU reset line.
const I8042_CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 as a reset line only: command 0xfe resets the CPU (Linux `reboot=k`), and
/// the controller otherwise reads as absent. Its status always shows a full output buffer
/// that never drains, so Linux's probe (`i8042_controller_check` flushes at most 16 bytes)
/// concludes "no controller" at once instead of timing out on every command — 2.3 s of a
/// nested 9.3 s boot when the controller half-answered. The input-buffer-full bit stays
/// clear, so the kernel's reset path (`kb_wait`, then 0xfe) does not wait either.
#[derive(Debug, Default)]
pub struct I8042;

impl I8042 {
    /// A port read at offset 0 (data) or 4 (status).
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            I8042_COMMAND_PORT => I8042_STATUS_SYS | I8042_STATUS_OBF,
            _ => 0xff,
        }
    }

    /// A port write; [`IoAction::Reset`] for the reset command.
    pub fn write(&mut self, port: u16, value: u8) -> IoAction {
        if port == I8042_COMMAND_PORT && value == I8042_CMD_RESET_CPU {
            IoAction::Reset
        } else {
            IoAction::None
        }
    }
}

/// Records when the guest first reports it has booted.
#[derive(Debug, Default)]
pub struct BootTimer {
    /// When the VM started (its vCPUs were first run).
    start: OnceLock<Instant>,
    /// Nanoseconds from start to the first magic write, plus one (0 = not yet).
    stamp: AtomicU64,
}

impl BootTimer {
    /// Marks the VM's start (only the first call counts).
    pub fn start(&self) {
        let _ = self.start.set(Instant::now());
    }

    /// A write to the boot-timer port (ignored before [`Self::start`]).
    pub fn write(&self, value: u8) {
        let Some(start) = self.start.get() else {
            return;
        };
        if value == BOOT_TIMER_MAGIC {
            let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
            // Only the first write counts.
            let _ = self
                .stamp
                .compare_exchange(0, ns + 1, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// Time from VM start to the guest's first boot-timer write.
    pub fn elapsed(&self) -> Option<Duration> {
        match self.stamp.load(Ordering::Acquire) {
            0 => None,
            n => Some(Duration::from_nanos(n - 1)),
        }
    }
}

/// All port-I/O devices, shared by the vCPU threads.
pub struct PortIo {
    serial: Mutex<SerialDevice>,
    i8042: Mutex<I8042>,
    boot_timer: BootTimer,
}

impl std::fmt::Debug for PortIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortIo")
            .field("i8042", &self.i8042)
            .field("boot_timer", &self.boot_timer)
            .finish_non_exhaustive()
    }
}

impl PortIo {
    /// The devices around a serial port.
    pub fn new(serial: SerialDevice) -> Self {
        Self {
            serial: Mutex::new(serial),
            i8042: Mutex::new(I8042),
            boot_timer: BootTimer::default(),
        }
    }

    /// The boot timer.
    pub fn boot_timer(&self) -> &BootTimer {
        &self.boot_timer
    }

    /// An `out` to `port` (only the first byte of wider accesses is used).
    pub fn write(&self, port: u16, data: &[u8]) -> IoAction {
        let Some(&value) = data.first() else {
            return IoAction::None;
        };
        match port {
            SERIAL_PORT_BASE..=0x3ff => {
                if let Ok(mut s) = self.serial.lock() {
                    // A sink error (a closed pipe) loses output, never stops the guest.
                    let _ = s.write((port - SERIAL_PORT_BASE) as u8, value);
                }
                IoAction::None
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT => self
                .i8042
                .lock()
                .map_or(IoAction::None, |mut k| k.write(port, value)),
            BOOT_TIMER_PORT => {
                self.boot_timer.write(value);
                IoAction::None
            }
            crate::acpi::ACPI_PM_PORT => AcpiPm::write(value),
            _ => IoAction::None,
        }
    }

    /// An `in` from `port`: fills `data`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        let value = match port {
            SERIAL_PORT_BASE..=0x3ff => self
                .serial
                .lock()
                .map_or(0xff, |mut s| s.read((port - SERIAL_PORT_BASE) as u8)),
            I8042_DATA_PORT | I8042_COMMAND_PORT => {
                self.i8042.lock().map_or(0xff, |mut k| k.read(port))
            }
            // Sleep control and status: nothing pending.
            crate::acpi::ACPI_PM_PORT | 0x601 => 0,
            _ => 0xff,
        };
        data.fill(0xff);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    /// The serial port's registers, for a snapshot.
    pub fn serial_regs(&self) -> crate::snapshot::SerialRegs {
        let st = match self.serial.lock() {
            Ok(s) => s.state(),
            Err(p) => p.into_inner().state(),
        };
        crate::snapshot::SerialRegs {
            regs: [
                st.baud_divisor_low,
                st.baud_divisor_high,
                st.interrupt_enable,
                st.interrupt_identification,
                st.line_control,
                st.line_status,
                st.modem_control,
                st.modem_status,
                st.scratch,
            ],
            in_buffer: st.in_buffer,
        }
    }

    /// Flushes the serial sink.
    pub fn flush_serial(&self) {
        if let Ok(mut s) = self.serial.lock() {
            let _ = s.writer_mut().flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A sink the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn port_io() -> (PortIo, Shared, EventFdTrigger) {
        let sink = Shared::default();
        let trigger = EventFdTrigger::new().unwrap();
        let serial = Serial::new(
            trigger.try_clone().unwrap(),
            Box::new(sink.clone()) as SerialSink,
        );
        let io = PortIo::new(serial);
        io.boot_timer().start();
        (io, sink, trigger)
    }

    #[test]
    fn serial_writes_reach_the_sink() {
        let (io, sink, _) = port_io();
        for b in b"hello\n" {
            assert_eq!(io.write(SERIAL_PORT_BASE, &[*b]), IoAction::None);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hello\n");
        // Line status: transmitter empty (bits 5 and 6) so the guest driver keeps writing.
        let mut lsr = [0u8];
        io.read(SERIAL_PORT_BASE + 5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn serial_raises_its_interrupt_through_the_eventfd() {
        let (io, _, trigger) = port_io();
        // IER: enable the THR-empty interrupt; the UART fires at once.
        io.write(SERIAL_PORT_BASE + 1, &[0x02]);
        assert_eq!(trigger.eventfd().read().unwrap(), 1);
        // IIR says why.
        let mut iir = [0u8];
        io.read(SERIAL_PORT_BASE + 2, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02);
    }

    #[test]
    fn i8042_reset_is_0xfe_on_the_command_port() {
        let mut k = I8042;
        assert_eq!(k.write(I8042_COMMAND_PORT, 0xfe), IoAction::Reset);
        assert_eq!(k.write(I8042_DATA_PORT, 0xfe), IoAction::None);
        assert_eq!(k.write(I8042_COMMAND_PORT, 0xaa), IoAction::None);
        let (io, _, _) = port_io();
        assert_eq!(io.write(I8042_COMMAND_PORT, &[0xfe]), IoAction::Reset);
        assert_eq!(io.write(0x61, &[0xfe]), IoAction::None);
    }

    #[test]
    fn i8042_reads_as_absent_to_a_probe_but_not_busy_to_a_reset() {
        let mut k = I8042;
        // Linux's flush: the output buffer never drains → "no controller".
        for _ in 0..32 {
            assert_ne!(k.read(I8042_COMMAND_PORT) & I8042_STATUS_OBF, 0);
            assert_eq!(k.read(I8042_DATA_PORT), 0xff);
        }
        // kb_wait before a reset: the input buffer is never full.
        assert_eq!(k.read(I8042_COMMAND_PORT) & 0x02, 0);
        // Commands other than the reset are ignored.
        assert_eq!(k.write(I8042_COMMAND_PORT, 0xaa), IoAction::None);
        assert_eq!(k.write(I8042_COMMAND_PORT, 0x20), IoAction::None);
    }

    #[test]
    fn boot_timer_records_the_first_magic_write_only() {
        let t = BootTimer::default();
        t.write(BOOT_TIMER_MAGIC);
        assert_eq!(t.elapsed(), None, "a write before start does not count");
        let (io, _, _) = port_io();
        assert_eq!(io.boot_timer().elapsed(), None);
        io.write(BOOT_TIMER_PORT, &[1]);
        assert_eq!(io.boot_timer().elapsed(), None);
        std::thread::sleep(Duration::from_millis(5));
        io.write(BOOT_TIMER_PORT, &[BOOT_TIMER_MAGIC]);
        let first = io.boot_timer().elapsed().unwrap();
        assert!(first >= Duration::from_millis(5));
        std::thread::sleep(Duration::from_millis(5));
        io.write(BOOT_TIMER_PORT, &[BOOT_TIMER_MAGIC]);
        assert_eq!(io.boot_timer().elapsed(), Some(first));
    }

    #[test]
    fn acpi_sleep_and_reset_registers() {
        let (io, _, _) = port_io();
        // Linux's acpi_hw_extended_sleep(S5): SLP_TYP 5 << 2 | SLP_EN.
        assert_eq!(io.write(0x600, &[(5 << 2) | (1 << 5)]), IoAction::PowerOff);
        // SLP_TYP 5 without SLP_EN, or another sleep state: nothing.
        assert_eq!(io.write(0x600, &[5 << 2]), IoAction::None);
        assert_eq!(io.write(0x600, &[(3 << 2) | (1 << 5)]), IoAction::None);
        // acpi_reset(): the FADT reset value.
        assert_eq!(io.write(0x600, &[1]), IoAction::Reset);
        let mut d = [0xaa];
        io.read(0x601, &mut d);
        assert_eq!(d, [0]);
    }

    #[test]
    fn unknown_ports_read_all_ones() {
        let (io, _, _) = port_io();
        let mut d = [0u8; 4];
        io.read(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert_eq!(io.write(0x80, &[0x12]), IoAction::None);
        assert_eq!(io.write(0x80, &[]), IoAction::None);
    }
}
