//! The cgroup v2 device filter: a `BPF_PROG_TYPE_CGROUP_DEVICE` program, loaded with the
//! raw `bpf(2)` syscall and attached to a cell's cgroup directory.
//!
//! cgroup v2 has no `devices.allow` file: the kernel asks the programs attached to a
//! task's cgroup (and, with `BPF_F_ALLOW_MULTI`, to every ancestor) whenever the task
//! creates (`mknod`) or opens a character or block device node, whatever its capabilities
//! and wherever the node lives. Every program must say yes.
//!
//! The program is built from [`DeviceRule`]s the way runc and crun build theirs: read the
//! type, access, major and minor from the `bpf_cgroup_dev_ctx`, then one block per rule
//! that jumps to the next rule on a mismatch and returns 1 (allow) on a match; falling off
//! the last rule returns 0 (deny, `EPERM`). The instructions are plain data
//! ([`Insn`], [`device_program`]), so the policy is unit-tested by evaluating the program
//! here, without a kernel.
//!
//! Device programs call no helpers, so the kernel needs no GPL-compatible licence for
//! them; the program says the project's.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

/// One eBPF instruction (`struct bpf_insn`): `regs` holds the destination register in its
/// low nibble and the source register in its high nibble (the bitfield layout on the
/// little-endian machines auraed runs on).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

/// A device node kind, as the program's context reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceType {
    /// `BPF_DEVCG_DEV_BLOCK`.
    Block = 1,
    /// `BPF_DEVCG_DEV_CHAR`.
    Char = 2,
}

/// `BPF_DEVCG_ACC_MKNOD`: create the node.
pub const ACC_MKNOD: u32 = 1;
/// `BPF_DEVCG_ACC_READ`: open it for reading.
pub const ACC_READ: u32 = 2;
/// `BPF_DEVCG_ACC_WRITE`: open it for writing.
pub const ACC_WRITE: u32 = 4;
/// Read, write and mknod.
pub const ACC_RWM: u32 = ACC_MKNOD | ACC_READ | ACC_WRITE;

/// One allowed device (class): `None` for major or minor matches any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRule {
    pub kind: DeviceType,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// The accesses allowed (`ACC_*` bits); a request is allowed when it asks for no
    /// more than these.
    pub access: u32,
}

const fn chr(major: u32, minor: Option<u32>) -> DeviceRule {
    DeviceRule {
        kind: DeviceType::Char,
        major: Some(major),
        minor,
        access: ACC_RWM,
    }
}

/// What a cell may create and open: the six nodes of a container's `/dev` (null, zero,
/// full, random, urandom, tty), `/dev/ptmx` and the pseudo-terminals behind it, and
/// nothing else: no block device, no other character device (no `/dev/mem`, `/dev/kmsg`,
/// `/dev/kvm`, `/dev/console`, …), whatever the process's uid or capabilities.
pub const DEFAULT_DEVICES: [DeviceRule; 8] = [
    chr(1, Some(3)), // /dev/null
    chr(1, Some(5)), // /dev/zero
    chr(1, Some(7)), // /dev/full
    chr(1, Some(8)), // /dev/random
    chr(1, Some(9)), // /dev/urandom
    chr(5, Some(0)), // /dev/tty
    chr(5, Some(2)), // /dev/ptmx
    chr(136, None),  // /dev/pts/N
];

/// `/dev/kvm` (10:232), for a cell granted it ([`CellDevices::kvm`]).
pub const KVM_DEVICE: DeviceRule = chr(10, Some(232));

/// Devices a cell may use beyond [`DEFAULT_DEVICES`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CellDevices {
    /// `/dev/kvm`: the cell's processes may run virtual machines of their own.
    pub kvm: bool,
}

impl CellDevices {
    /// The filter's rules: [`DEFAULT_DEVICES`] and what this adds.
    pub fn rules(self) -> Vec<DeviceRule> {
        let mut r = DEFAULT_DEVICES.to_vec();
        if self.kvm {
            r.push(KVM_DEVICE);
        }
        r
    }
}

// Opcodes (class | operation | source).
const LDX_MEM_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const ALU32_AND_K: u8 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const ALU32_RSH_K: u8 = 0x74; // BPF_ALU | BPF_RSH | BPF_K
const ALU32_MOV_K: u8 = 0xb4; // BPF_ALU | BPF_MOV | BPF_K
const ALU32_MOV_X: u8 = 0xbc; // BPF_ALU | BPF_MOV | BPF_X
const JMP_JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const JMP_JNE_X: u8 = 0x5d; // BPF_JMP | BPF_JNE | BPF_X
const JMP_EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

// Registers: R1 holds the context on entry; R2..R5 the fields it is read into.
const R0: u8 = 0;
const R1: u8 = 1;
const R_TYPE: u8 = 2;
const R_ACCESS: u8 = 3;
const R_MAJOR: u8 = 4;
const R_MINOR: u8 = 5;

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

/// `struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }`, where
/// `access_type` is `(access << 16) | type`.
const PROLOGUE: [Insn; 6] = [
    insn(LDX_MEM_W, R_TYPE, R1, 0, 0),
    insn(ALU32_AND_K, R_TYPE, 0, 0, 0xffff),
    insn(LDX_MEM_W, R_ACCESS, R1, 0, 0),
    insn(ALU32_RSH_K, R_ACCESS, 0, 0, 16),
    insn(LDX_MEM_W, R_MAJOR, R1, 4, 0),
    insn(LDX_MEM_W, R_MINOR, R1, 8, 0),
];

/// The program for `rules`: allow what one of them allows, deny the rest.
pub fn device_program(rules: &[DeviceRule]) -> Vec<Insn> {
    let mut p = PROLOGUE.to_vec();
    for r in rules {
        // Every test jumps past the end of this block (to the next rule) on a mismatch;
        // offsets count from the instruction after the jump.
        let mut block: Vec<(Insn, bool)> =
            vec![(insn(JMP_JNE_K, R_TYPE, 0, 0, r.kind as i32), true)];
        if r.access & ACC_RWM != ACC_RWM {
            // (requested & allowed) != requested: asks for more than allowed.
            block.push((insn(ALU32_MOV_X, R1, R_ACCESS, 0, 0), false));
            block.push((
                insn(ALU32_AND_K, R1, 0, 0, (r.access & ACC_RWM) as i32),
                false,
            ));
            block.push((insn(JMP_JNE_X, R1, R_ACCESS, 0, 0), true));
        }
        if let Some(m) = r.major {
            block.push((insn(JMP_JNE_K, R_MAJOR, 0, 0, m as i32), true));
        }
        if let Some(m) = r.minor {
            block.push((insn(JMP_JNE_K, R_MINOR, 0, 0, m as i32), true));
        }
        block.push((insn(ALU32_MOV_K, R0, 0, 0, 1), false));
        block.push((insn(JMP_EXIT, 0, 0, 0, 0), false));
        let len = block.len();
        for (i, (mut ins, jump)) in block.into_iter().enumerate() {
            if jump {
                ins.off = (len - i - 1) as i16;
            }
            p.push(ins);
        }
    }
    p.push(insn(ALU32_MOV_K, R0, 0, 0, 0));
    p.push(insn(JMP_EXIT, 0, 0, 0, 0));
    p
}

/// Why the device filter could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum DeviceFilterError {
    /// `BPF_PROG_LOAD` failed: no `bpf(2)` (CONFIG_BPF_SYSCALL), no cgroup device
    /// programs (CONFIG_CGROUP_BPF), no CAP_SYS_ADMIN/CAP_BPF, or the verifier refused
    /// the program (its log is attached).
    #[error(
        "the kernel refused to load the cgroup device filter (bpf BPF_PROG_LOAD; needs CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF and CAP_SYS_ADMIN): {source}{log}"
    )]
    Load {
        #[source]
        source: io::Error,
        /// The verifier's log, if it said anything (prefixed for display).
        log: String,
    },
    /// `BPF_PROG_ATTACH` to the cgroup failed.
    #[error(
        "the kernel refused to attach the cgroup device filter (bpf BPF_PROG_ATTACH, BPF_CGROUP_DEVICE): {0}"
    )]
    Attach(#[source] io::Error),
}

const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;
const BPF_PROG_QUERY: libc::c_int = 16;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type` (no padding).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for `BPF_PROG_ATTACH`, up to `replace_bpf_fd`.
#[repr(C)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// `union bpf_attr` for `BPF_PROG_QUERY`, up to `prog_cnt` (padded to 8 bytes).
#[repr(C)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    pad: u32,
}

/// `bpf(cmd, attr, size_of(attr))`.
///
/// # Safety
/// `attr` must be the attribute layout `cmd` reads, and every pointer in it valid for
/// the call.
unsafe fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: forwarded to the caller's contract; the size is the attribute's own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn load_once(prog: &[Insn], log: Option<&mut [u8]>) -> io::Result<OwnedFd> {
    let license = c"Apache-2.0";
    let mut name = [0u8; 16];
    name[..13].copy_from_slice(b"aurae_devices");
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: u32::try_from(prog.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        ..ProgLoadAttr::default()
    };
    if let Some(log) = log {
        attr.log_level = 1;
        attr.log_size = u32::try_from(log.len()).unwrap_or(u32::MAX);
        attr.log_buf = log.as_mut_ptr() as u64;
    }
    // SAFETY: a BPF_PROG_LOAD attribute whose pointers (instructions, licence, log) stay
    // valid for the call, with the instruction count and log size they hold.
    let fd = unsafe { bpf(BPF_PROG_LOAD, &mut attr)? };
    let fd = libc::c_int::try_from(fd).map_err(|_| io::Error::other("bpf fd out of range"))?;
    // SAFETY: BPF_PROG_LOAD returned a new program fd (close-on-exec) that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Loads `prog` as a cgroup device program; on failure, loads it again with the
/// verifier's log on to say why.
pub fn load_device_program(prog: &[Insn]) -> Result<OwnedFd, DeviceFilterError> {
    load_once(prog, None).map_err(|source| {
        let mut buf = vec![0u8; 64 * 1024];
        let _ = load_once(prog, Some(&mut buf));
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        let text = String::from_utf8_lossy(&buf[..end]).trim().to_owned();
        DeviceFilterError::Load {
            source,
            log: if text.is_empty() {
                String::new()
            } else {
                format!("; verifier: {text}")
            },
        }
    })
}

/// Loads the device filter for `devices` ([`DEFAULT_DEVICES`] and what `devices` adds)
/// and attaches it (`BPF_F_ALLOW_MULTI`: child cgroups may add their own, every program
/// must allow) to the cgroup v2 directory `cgroup`. The attachment holds the program: it
/// lives until the cgroup is removed.
pub fn attach_device_filter(
    cgroup: BorrowedFd<'_>,
    devices: CellDevices,
) -> Result<(), DeviceFilterError> {
    let prog = program(devices)?;
    let mut attr = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
    };
    // SAFETY: a BPF_PROG_ATTACH attribute of two open fds and integers.
    unsafe { bpf(BPF_PROG_ATTACH, &mut attr) }
        .map(drop)
        .map_err(DeviceFilterError::Attach)
}

/// The device programs, each loaded (and verified by the kernel) once per process and
/// attached to every cell that uses it: one program serves any number of cgroups.
static DEFAULT_PROGRAM: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();
static KVM_PROGRAM: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();

fn program(devices: CellDevices) -> Result<BorrowedFd<'static>, DeviceFilterError> {
    use std::os::fd::AsFd;
    let cache = if devices.kvm {
        &KVM_PROGRAM
    } else {
        &DEFAULT_PROGRAM
    };
    if let Some(fd) = cache.get() {
        return Ok(fd.as_fd());
    }
    let fd = load_device_program(&device_program(&devices.rules()))?;
    // Two first callers may both load it: one copy is kept, the other closed.
    Ok(cache.get_or_init(|| fd).as_fd())
}

/// How many device programs are attached to the cgroup directory `cgroup` itself (not
/// its ancestors'): for tests and probes.
pub fn device_programs_attached(cgroup: BorrowedFd<'_>) -> io::Result<u32> {
    let mut attr = ProgQueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: 0,
        prog_cnt: 0,
        pad: 0,
    };
    // SAFETY: a BPF_PROG_QUERY attribute with no id buffer (prog_ids 0): the kernel only
    // writes the count into `attr`.
    unsafe { bpf(BPF_PROG_QUERY, &mut attr)? };
    Ok(attr.prog_cnt)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

    use std::{ffi::CString, os::fd::AsFd, path::PathBuf};

    use super::*;

    /// Evaluates a device program (the instructions [`device_program`] emits) on one
    /// context; `None` if it runs off the end or meets an unknown instruction.
    fn eval(prog: &[Insn], kind: u32, access: u32, major: u32, minor: u32) -> Option<u64> {
        let ctx = [(access << 16) | kind, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        for _ in 0..4096 {
            let i = prog.get(pc)?;
            let (dst, src) = (usize::from(i.regs & 0x0f), usize::from(i.regs >> 4));
            pc += 1;
            match i.code {
                LDX_MEM_W => {
                    assert_eq!(src, 1, "loads from the context only");
                    r[dst] = u64::from(ctx[usize::try_from(i.off).ok()? / 4]);
                }
                ALU32_AND_K => r[dst] = u64::from((r[dst] as u32) & (i.imm as u32)),
                ALU32_RSH_K => r[dst] = u64::from((r[dst] as u32) >> i.imm),
                ALU32_MOV_K => r[dst] = u64::from(i.imm as u32),
                ALU32_MOV_X => r[dst] = u64::from(r[src] as u32),
                JMP_JNE_K | JMP_JNE_X => {
                    let other = if i.code == JMP_JNE_K {
                        i.imm as i64 as u64
                    } else {
                        r[src]
                    };
                    if r[dst] != other {
                        pc = pc.checked_add_signed(isize::from(i.off))?;
                    }
                }
                JMP_EXIT => return Some(r[0]),
                _ => return None,
            }
        }
        None
    }

    const C: u32 = DeviceType::Char as u32;
    const B: u32 = DeviceType::Block as u32;

    #[test]
    fn the_default_filter_allows_the_container_devices_and_nothing_else() {
        let p = device_program(&DEFAULT_DEVICES);
        let allow = |k, a, ma, mi| eval(&p, k, a, ma, mi) == Some(1);
        for (ma, mi) in [
            (1, 3),
            (1, 5),
            (1, 7),
            (1, 8),
            (1, 9),
            (5, 0),
            (5, 2),
            (136, 0),
            (136, 4095),
        ] {
            for a in [
                ACC_READ,
                ACC_WRITE,
                ACC_READ | ACC_WRITE,
                ACC_MKNOD,
                ACC_RWM,
            ] {
                assert!(allow(C, a, ma, mi), "c {ma}:{mi} access {a}");
            }
            assert!(
                !allow(B, ACC_READ, ma, mi),
                "b {ma}:{mi} is not c {ma}:{mi}"
            );
        }
        for (ma, mi) in [
            (1, 1),    // /dev/mem
            (1, 2),    // /dev/kmem
            (1, 4),    // /dev/port
            (1, 11),   // /dev/kmsg
            (5, 1),    // /dev/console
            (4, 0),    // /dev/tty0
            (10, 232), // /dev/kvm
            (10, 200), // /dev/net/tun
            (137, 0),  // not pts
            (0, 0),
        ] {
            for a in [ACC_READ, ACC_WRITE, ACC_MKNOD] {
                assert!(!allow(C, a, ma, mi), "c {ma}:{mi} access {a}");
            }
        }
        // Every block device, for every access: loop, sda, nvme, vda, device-mapper.
        for (ma, mi) in [(7, 0), (7, 1), (8, 0), (259, 0), (254, 0), (253, 0), (1, 3)] {
            for a in [ACC_READ, ACC_WRITE, ACC_MKNOD, ACC_RWM] {
                assert!(!allow(B, a, ma, mi), "b {ma}:{mi} access {a}");
            }
        }
        // An unknown type is denied too.
        assert!(!allow(3, ACC_READ, 1, 3));
    }

    #[test]
    fn the_kvm_filter_adds_exactly_dev_kvm() {
        let d = device_program(&DEFAULT_DEVICES);
        let k = device_program(&CellDevices { kvm: true }.rules());
        assert_eq!(CellDevices::default().rules(), DEFAULT_DEVICES.to_vec());
        for a in [ACC_READ, ACC_WRITE, ACC_READ | ACC_WRITE] {
            assert_eq!(eval(&k, C, a, 10, 232), Some(1), "kvm, access {a}");
            assert_ne!(
                eval(&d, C, a, 10, 232),
                Some(1),
                "kvm by default, access {a}"
            );
        }
        // Nothing else comes with it: tun, the rest of misc, block 10:232.
        for (kind, ma, mi) in [
            (C, 10, 200),
            (C, 10, 231),
            (C, 10, 233),
            (B, 10, 232),
            (C, 1, 1),
        ] {
            assert_ne!(
                eval(&k, kind, ACC_READ, ma, mi),
                Some(1),
                "{kind} {ma}:{mi}"
            );
        }
        for (ma, mi) in [(1, 3), (5, 2), (136, 7)] {
            assert_eq!(eval(&k, C, ACC_READ, ma, mi), Some(1), "c {ma}:{mi}");
        }
    }

    #[test]
    fn partial_access_rules_allow_no_more_than_they_name() {
        let p = device_program(&[DeviceRule {
            kind: DeviceType::Char,
            major: Some(10),
            minor: None,
            access: ACC_READ,
        }]);
        assert_eq!(eval(&p, C, ACC_READ, 10, 1), Some(1));
        assert_eq!(eval(&p, C, ACC_READ | ACC_WRITE, 10, 1), Some(0));
        assert_eq!(eval(&p, C, ACC_MKNOD, 10, 1), Some(0));
        assert_eq!(eval(&p, C, ACC_READ, 11, 1), Some(0));
        assert_eq!(eval(&device_program(&[]), C, ACC_READ, 1, 3), Some(0));
    }

    #[test]
    fn the_encoding_is_the_kernels() {
        let p = device_program(&[chr(1, Some(3))]);
        // The prologue: r2 = type, r3 = access, r4 = major, r5 = minor.
        assert_eq!(
            p[..6],
            [
                Insn {
                    code: 0x61,
                    regs: 0x12,
                    off: 0,
                    imm: 0
                },
                Insn {
                    code: 0x54,
                    regs: 0x02,
                    off: 0,
                    imm: 0xffff
                },
                Insn {
                    code: 0x61,
                    regs: 0x13,
                    off: 0,
                    imm: 0
                },
                Insn {
                    code: 0x74,
                    regs: 0x03,
                    off: 0,
                    imm: 16
                },
                Insn {
                    code: 0x61,
                    regs: 0x14,
                    off: 4,
                    imm: 0
                },
                Insn {
                    code: 0x61,
                    regs: 0x15,
                    off: 8,
                    imm: 0
                },
            ]
        );
        // One rwm rule: three tests that skip the rest of the block, then allow.
        assert_eq!(
            p[6..],
            [
                Insn {
                    code: 0x55,
                    regs: 0x02,
                    off: 4,
                    imm: 2
                },
                Insn {
                    code: 0x55,
                    regs: 0x04,
                    off: 3,
                    imm: 1
                },
                Insn {
                    code: 0x55,
                    regs: 0x05,
                    off: 2,
                    imm: 3
                },
                Insn {
                    code: 0xb4,
                    regs: 0x00,
                    off: 0,
                    imm: 1
                },
                Insn {
                    code: 0x95,
                    regs: 0x00,
                    off: 0,
                    imm: 0
                },
                Insn {
                    code: 0xb4,
                    regs: 0x00,
                    off: 0,
                    imm: 0
                },
                Insn {
                    code: 0x95,
                    regs: 0x00,
                    off: 0,
                    imm: 0
                },
            ]
        );
        assert_eq!(std::mem::size_of::<Insn>(), 8);
        assert_eq!(std::mem::size_of::<ProgLoadAttr>(), 72);
        assert_eq!(std::mem::size_of::<ProgAttachAttr>(), 20);
        assert_eq!(std::mem::size_of::<ProgQueryAttr>(), 32);
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// A fresh cgroup v2 directory for the test, or why not (printed as a SKIP).
    fn test_cgroup(test: &str) -> Option<PathBuf> {
        if !is_root() {
            println!("SKIP {test}: needs root");
            return None;
        }
        for p in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
            let is_v2 = std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
                m.lines().any(|l| {
                    let f: Vec<&str> = l.split(' ').collect();
                    f.get(4) == Some(&p) && l.contains(" - cgroup2 ")
                })
            });
            if is_v2 {
                let dir = PathBuf::from(p).join(format!("aurae-sys-{test}-{}", std::process::id()));
                std::fs::create_dir(&dir).unwrap();
                return Some(dir);
            }
        }
        println!("SKIP {test}: no cgroup v2 hierarchy");
        None
    }

    #[test]
    fn the_kernel_accepts_the_program() {
        if !is_root() {
            println!("SKIP the_kernel_accepts_the_program: needs root");
            return;
        }
        load_device_program(&device_program(&DEFAULT_DEVICES)).unwrap();
        // And explains a refusal: a program that reads past the context.
        let bad = [insn(LDX_MEM_W, R0, R1, 12, 0), insn(JMP_EXIT, 0, 0, 0, 0)];
        let err = load_device_program(&bad).unwrap_err().to_string();
        assert!(err.contains("verifier"), "{err}");
    }

    /// Runs `sh -c script` as root (with every capability) in the cgroup `dir`; its exit
    /// code and what it wrote (stdout and stderr).
    fn sh_in(dir: &std::path::Path, script: &str) -> (i32, String) {
        let cg = std::fs::File::open(dir).unwrap();
        let argv = [
            CString::new("/bin/sh").unwrap(),
            CString::new("-c").unwrap(),
            CString::new(script).unwrap(),
        ];
        let out = tempfile::tempfile().unwrap();
        let devnull = std::fs::File::open("/dev/null").unwrap();
        let req = crate::SpawnRequest {
            program: crate::spawn::Program::Path(&argv[0]),
            argv: &argv,
            envp: &[],
            cwd: None,
            uid: None,
            gid: None,
            no_new_privs: false,
            stdio: [devnull.as_raw_fd(), out.as_raw_fd(), out.as_raw_fd()],
            controlling_terminal: false,
            pass_fd: None,
            cgroup: Some(cg.as_raw_fd()),
            new_namespaces: crate::Namespaces::default(),
            pid_namespace_of: None,
            join: None,
            unshare: crate::Namespaces::default(),
            container: None,
            console: None,
        };
        let (_, pidfd) = crate::spawn(&req).unwrap();
        let code = match pidfd.wait_blocking().unwrap() {
            crate::ExitStatus::Code(c) => c,
            other => panic!("{script}: {other:?}"),
        };
        let mut text = String::new();
        let mut out = out;
        std::io::Seek::rewind(&mut out).unwrap();
        std::io::Read::read_to_string(&mut out, &mut text).unwrap();
        (code, text)
    }

    #[test]
    fn an_attached_filter_refuses_block_devices_to_root() {
        let test = "an_attached_filter_refuses_block_devices_to_root";
        let Some(cg) = test_cgroup(test) else { return };
        let tmp = tempfile::tempdir().unwrap();
        let blk = tmp.path().join("blk");
        let path = CString::new(blk.to_str().unwrap()).unwrap();
        // SAFETY: mknod on a NUL-terminated path in our private directory.
        let made =
            unsafe { libc::mknod(path.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(7, 0)) };
        assert_eq!(made, 0, "{}", io::Error::last_os_error());
        // Opened for reading only, never read.
        let open = format!("exec 3< {}", blk.display());
        let mk = format!("mknod {}/other b 7 0", tmp.path().display());
        // Before: root in that cgroup opens the node.
        let before = sh_in(&cg, &open);
        let f = std::fs::File::open(&cg).unwrap();
        let attached_before = device_programs_attached(f.as_fd()).unwrap();
        let attach = attach_device_filter(f.as_fd(), CellDevices::default());
        let attached = device_programs_attached(f.as_fd()).unwrap();
        let results = [
            sh_in(&cg, &open),
            sh_in(&cg, &mk),
            sh_in(
                &cg,
                "exec 3< /dev/null && echo x > /dev/null && head -c 1 /dev/urandom >/dev/null",
            ),
        ];
        drop(f);
        let _ = std::fs::remove_dir(&cg);
        println!("before: {before:?}; with the filter: {results:?}");
        assert_eq!(before, (0, String::new()));
        attach.unwrap();
        assert_eq!((attached_before, attached), (0, 1));
        let (code, out) = &results[0];
        assert!(
            *code != 0 && out.contains("Operation not permitted"),
            "open: {code} {out}"
        );
        let (code, out) = &results[1];
        assert!(
            *code != 0 && out.contains("Operation not permitted"),
            "mknod: {code} {out}"
        );
        assert!(!tmp.path().join("other").exists());
        assert_eq!(results[2], (0, String::new()), "/dev/null and /dev/urandom");
    }
}
