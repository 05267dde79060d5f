//! virtio-blk on a host file (raw image), read-only or read-write.
//!
//! Features offered: `VIRTIO_F_VERSION_1`, `VIRTIO_BLK_F_SEG_MAX`, `VIRTIO_BLK_F_FLUSH`,
//! and `VIRTIO_BLK_F_RO` for a read-only drive. Requests: `IN`, `OUT`, `FLUSH`, `GET_ID`;
//! anything else is answered `VIRTIO_BLK_S_UNSUPP`. One queue of [`QUEUE_SIZE`], served
//! synchronously (`pread`/`pwrite` through the device's own bounce buffer of
//! [`BOUNCE_BYTES`], a request in as many pieces as it takes) on the thread that takes the
//! notification: a request allocates nothing on that (filtered) thread.
//!
//! Each request is checked before any I/O: the header must be 16 readable bytes, the last
//! writable byte is the status, data lengths must be whole sectors, at most
//! [`MAX_REQUEST_BYTES`], and inside the disk; a write to a read-only drive fails. A
//! failed check is `VIRTIO_BLK_S_IOERR`; a chain with no writable byte (nowhere to put a
//! status) or outside guest memory is returned with length 0. Nothing a guest writes can
//! make this code panic.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::FileExt,
    path::Path,
};

use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::{VIRTIO_F_VERSION_1, VirtioDevice, read_config_bytes};

/// virtio device id of a block device.
pub const DEVICE_TYPE: u32 = 2;
/// The queue's size.
pub const QUEUE_SIZE: u16 = 256;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// The largest data transfer of one request (larger requests fail with IOERR).
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// The bounce buffer a request's data goes through, made with the device (a larger
/// request is copied in pieces of this size).
pub const BOUNCE_BYTES: usize = 256 << 10;
/// `seg_max` offered: data segments per request.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Length of a `GET_ID` answer.
pub const ID_BYTES: usize = 20;

/// Feature: `seg_max` in the configuration is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// Feature: the device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature: the device takes `FLUSH`.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Device id string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error (also: a request that breaks the rules).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// A virtio-blk device on a file.
pub struct Block {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_BYTES],
    sizes: [u16; 1],
    config: [u8; 16],
    bounce: Box<[u8]>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("file", &self.file)
            .field("read_only", &self.read_only)
            .field("capacity_sectors", &self.capacity_sectors)
            .finish_non_exhaustive()
    }
}

impl Block {
    /// Opens `path` (read-only or read-write). The disk is the file's length rounded down
    /// to whole sectors; `id` (at most 20 bytes are used) answers `GET_ID`.
    pub fn open(path: &Path, read_only: bool, id: &str) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        Self::new(file, read_only, id)
    }

    /// A device on an open file.
    pub fn new(file: File, read_only: bool, id: &str) -> io::Result<Self> {
        let capacity_sectors = file.metadata()?.len() / SECTOR_SIZE;
        let mut id_bytes = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        // Configuration: capacity (u64), size_max (u32, not offered), seg_max (u32).
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&capacity_sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        Ok(Self {
            file,
            read_only,
            capacity_sectors,
            id: id_bytes,
            sizes: [QUEUE_SIZE],
            config,
            bounce: vec![0u8; BOUNCE_BYTES].into_boxed_slice(),
        })
    }

    /// The disk's size in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Handles one request; returns the number of bytes written to guest memory (data and
    /// status), the used length.
    pub fn handle(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        let Ok(mut reader) = chain.clone().reader::<()>(mem) else {
            return 0;
        };
        let Ok(mut data) = chain.writer::<()>(mem) else {
            return 0;
        };
        let writable = data.available_bytes();
        if writable == 0 {
            return 0;
        }
        let Ok(mut status_w) = data.split_at(writable - 1) else {
            return 0;
        };
        let status = self.execute(&mut reader, &mut data);
        let written = data.bytes_written();
        if status_w.write_all(&[status]).is_err() {
            return 0;
        }
        u32::try_from(written + 1).unwrap_or(u32::MAX)
    }

    fn execute(&mut self, reader: &mut Reader<'_>, data: &mut Writer<'_>) -> u8 {
        let mut header = [0u8; 16];
        if reader.read_exact(&mut header).is_err() {
            return VIRTIO_BLK_S_IOERR;
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector);
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = data.available_bytes();
                let Some(offset) = self.check_range(sector, len) else {
                    return VIRTIO_BLK_S_IOERR;
                };
                let mut done = 0;
                while done < len {
                    let buf = &mut self.bounce[..(len - done).min(BOUNCE_BYTES)];
                    if self.file.read_exact_at(buf, offset + done as u64).is_err()
                        || data.write_all(buf).is_err()
                    {
                        return VIRTIO_BLK_S_IOERR;
                    }
                    done += buf.len();
                }
                VIRTIO_BLK_S_OK
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return VIRTIO_BLK_S_IOERR;
                }
                let len = reader.available_bytes();
                let Some(offset) = self.check_range(sector, len) else {
                    return VIRTIO_BLK_S_IOERR;
                };
                let mut done = 0;
                while done < len {
                    let buf = &mut self.bounce[..(len - done).min(BOUNCE_BYTES)];
                    if reader.read_exact(buf).is_err()
                        || self.file.write_all_at(buf, offset + done as u64).is_err()
                    {
                        return VIRTIO_BLK_S_IOERR;
                    }
                    done += buf.len();
                }
                VIRTIO_BLK_S_OK
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.read_only && self.file.sync_data().is_err() {
                    return VIRTIO_BLK_S_IOERR;
                }
                VIRTIO_BLK_S_OK
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = data.available_bytes().min(ID_BYTES);
                if data.write_all(&self.id[..n]).is_err() {
                    return VIRTIO_BLK_S_IOERR;
                }
                VIRTIO_BLK_S_OK
            }
            _ => VIRTIO_BLK_S_UNSUPP,
        }
    }

    /// The byte offset of a transfer of `len` bytes at `sector`, if it is whole sectors,
    /// not too large, and inside the disk.
    fn check_range(&self, sector: u64, len: usize) -> Option<u64> {
        if len > MAX_REQUEST_BYTES || !(len as u64).is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        let end = sector.checked_add(len as u64 / SECTOR_SIZE)?;
        if end > self.capacity_sectors {
            return None;
        }
        sector.checked_mul(SECTOR_SIZE)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH | ro
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = self.handle(chain, mem);
            if queue.add_used(mem, head, len).is_err() {
                break;
            }
            used = true;
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom};

    use virtio_queue::{desc::RawDescriptor, mock::MockSplitQueue};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::tests::{F_NEXT, F_WRITE, desc};

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    fn disk(sectors: u64) -> File {
        let mut f = tempfile::tempfile().unwrap();
        for s in 0..sectors {
            f.write_all(&[s as u8; SECTOR_SIZE as usize]).unwrap();
        }
        f.seek(SeekFrom::Start(0)).unwrap();
        f
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Runs one chain through the device: returns (used length, status byte).
    fn run(blk: &mut Block, mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (u32, u8) {
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let vq = MockSplitQueue::new(mem, 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(blk.process_queue(0, &mut q, mem));
        let used_len = vq.used().ring().ref_at(0).unwrap().load().len();
        (used_len, mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn request(data_len: u32, data_flags: u16) -> Vec<RawDescriptor> {
        vec![
            desc(HDR, 16, F_NEXT, 1),
            desc(DATA, data_len, F_NEXT | data_flags, 2),
            desc(STATUS, 1, F_WRITE, 0),
        ]
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    #[test]
    fn features_and_config() {
        let blk = Block::new(disk(8), true, "disk0").unwrap();
        assert_eq!(blk.capacity_sectors(), 8);
        let f = blk.features();
        assert_ne!(f & VIRTIO_F_VERSION_1, 0);
        assert_ne!(f & VIRTIO_BLK_F_RO, 0);
        assert_ne!(f & VIRTIO_BLK_F_FLUSH, 0);
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut seg = [0u8; 4];
        blk.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
        let rw = Block::new(disk(1), false, "").unwrap();
        assert_eq!(rw.features() & VIRTIO_BLK_F_RO, 0);
    }

    #[test]
    fn read_returns_the_sectors() {
        let mem = mem();
        let mut blk = Block::new(disk(8), false, "d").unwrap();
        header(&mem, VIRTIO_BLK_T_IN, 2);
        let (len, status) = run(&mut blk, &mem, &request(1024, F_WRITE));
        assert_eq!((len, status), (1025, VIRTIO_BLK_S_OK));
        let mut buf = [0u8; 1024];
        mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 2));
        assert!(buf[512..].iter().all(|&b| b == 3));
    }

    #[test]
    fn write_then_read_back() {
        let mem = mem();
        let mut blk = Block::new(disk(8), false, "d").unwrap();
        mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 7);
        let (len, status) = run(&mut blk, &mem, &request(512, 0));
        assert_eq!((len, status), (1, VIRTIO_BLK_S_OK));
        let mut back = [0u8; 512];
        blk.file.read_exact_at(&mut back, 7 * 512).unwrap();
        assert_eq!(back, [0x5a; 512]);
        // Flush.
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let descs = [desc(HDR, 16, F_NEXT, 1), desc(STATUS, 1, F_WRITE, 0)];
        assert_eq!(run(&mut blk, &mem, &descs), (1, VIRTIO_BLK_S_OK));
    }

    #[test]
    fn read_only_drive_refuses_writes() {
        let mem = mem();
        let mut blk = Block::new(disk(8), true, "d").unwrap();
        mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        let (_, status) = run(&mut blk, &mem, &request(512, 0));
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
        let mut back = [0u8; 512];
        blk.file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, [0; 512], "the disk is unchanged");
    }

    #[test]
    fn out_of_range_and_partial_sectors_are_io_errors() {
        let mem = mem();
        let mut blk = Block::new(disk(8), false, "d").unwrap();
        // Last sector + one more.
        header(&mem, VIRTIO_BLK_T_IN, 7);
        assert_eq!(
            run(&mut blk, &mem, &request(1024, F_WRITE)).1,
            VIRTIO_BLK_S_IOERR
        );
        // A sector number that overflows.
        header(&mem, VIRTIO_BLK_T_IN, u64::MAX);
        assert_eq!(
            run(&mut blk, &mem, &request(512, F_WRITE)).1,
            VIRTIO_BLK_S_IOERR
        );
        // Not a whole sector.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            run(&mut blk, &mem, &request(100, F_WRITE)).1,
            VIRTIO_BLK_S_IOERR
        );
        // Exactly the last sector is fine.
        header(&mem, VIRTIO_BLK_T_IN, 7);
        assert_eq!(
            run(&mut blk, &mem, &request(512, F_WRITE)).1,
            VIRTIO_BLK_S_OK
        );
    }

    #[test]
    fn malformed_chains_are_refused() {
        let mem = mem();
        let mut blk = Block::new(disk(8), false, "d").unwrap();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        // No writable descriptor: nowhere to put a status; used length 0, nothing written.
        let descs = [desc(HDR, 16, F_NEXT, 1), desc(DATA, 512, 0, 0)];
        assert_eq!(run(&mut blk, &mem, &descs), (0, 0xee));
        // A header shorter than 16 bytes.
        let descs = [desc(HDR, 8, F_NEXT, 1), desc(STATUS, 1, F_WRITE, 0)];
        assert_eq!(run(&mut blk, &mem, &descs), (1, VIRTIO_BLK_S_IOERR));
        // A data descriptor outside guest memory.
        let descs = [
            desc(HDR, 16, F_NEXT, 1),
            desc(0xffff_0000, 512, F_NEXT | F_WRITE, 2),
            desc(STATUS, 1, F_WRITE, 0),
        ];
        assert_eq!(run(&mut blk, &mem, &descs), (0, 0xee));
        // An unknown request type.
        header(&mem, 99, 0);
        let descs = [desc(HDR, 16, F_NEXT, 1), desc(STATUS, 1, F_WRITE, 0)];
        assert_eq!(run(&mut blk, &mem, &descs), (1, VIRTIO_BLK_S_UNSUPP));
    }

    #[test]
    fn get_id() {
        let mem = mem();
        let mut blk = Block::new(disk(1), true, "aurae-disk-0").unwrap();
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let (len, status) = run(&mut blk, &mem, &request(ID_BYTES as u32, F_WRITE));
        assert_eq!((len, status), (ID_BYTES as u32 + 1, VIRTIO_BLK_S_OK));
        let mut id = [0u8; ID_BYTES];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..12], b"aurae-disk-0");
        assert_eq!(id[12..], [0; 8]);
    }

    /// A disk whose sectors each start with their own number (so a piece copied to or
    /// from the wrong place shows).
    fn numbered_disk(sectors: u64) -> File {
        let mut f = tempfile::tempfile().unwrap();
        for s in 0..sectors {
            let mut sector = [(s % 251) as u8; SECTOR_SIZE as usize];
            sector[..8].copy_from_slice(&s.to_le_bytes());
            f.write_all(&sector).unwrap();
        }
        f
    }

    fn sector_number(bytes: &[u8]) -> u64 {
        u64::from_le_bytes(bytes[..8].try_into().unwrap())
    }

    /// A request of 1.5 MiB (six bounce buffers' worth) in two descriptors of 768 KiB.
    const BIG: u32 = 768 << 10;
    const DATA_A: u64 = 0x40_0000;
    const DATA_B: u64 = 0x60_0000;

    fn big_request(data_flags: u16) -> Vec<RawDescriptor> {
        vec![
            desc(HDR, 16, F_NEXT, 1),
            desc(DATA_A, BIG, F_NEXT | data_flags, 2),
            desc(DATA_B, BIG, F_NEXT | data_flags, 3),
            desc(STATUS, 1, F_WRITE, 0),
        ]
    }

    fn big_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
    }

    /// The guest's 1.5 MiB as the sectors it holds, in order.
    fn guest_sectors(mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for base in [DATA_A, DATA_B] {
            let mut buf = vec![0u8; BIG as usize];
            mem.read_slice(&mut buf, GuestAddress(base)).unwrap();
            out.extend(buf.chunks(SECTOR_SIZE as usize).map(<[u8]>::to_vec));
        }
        out
    }

    #[test]
    fn a_request_larger_than_the_bounce_buffer_is_copied_whole_and_in_place() {
        assert!(2 * BIG as usize > 4 * BOUNCE_BYTES);
        let mem = big_mem();
        let mut blk = Block::new(numbered_disk(4096), false, "d").unwrap();
        header(&mem, VIRTIO_BLK_T_IN, 5);
        let (len, status) = run(&mut blk, &mem, &big_request(F_WRITE));
        assert_eq!((len, status), (2 * BIG + 1, VIRTIO_BLK_S_OK));
        let got = guest_sectors(&mem);
        assert_eq!(got.len(), 3072);
        for (i, sector) in got.iter().enumerate() {
            let want = 5 + i as u64;
            assert_eq!(sector_number(sector), want, "guest sector {i}");
            assert!(sector[8..].iter().all(|&b| b == (want % 251) as u8), "{i}");
        }

        // Written back 1000 sectors further on: each lands where it belongs, the sectors
        // around are untouched.
        for (i, base) in [DATA_A, DATA_B].into_iter().enumerate() {
            for s in 0..(BIG as u64 / SECTOR_SIZE) {
                let n = 1_000_000 + i as u64 * 10_000 + s;
                mem.write_slice(&n.to_le_bytes(), GuestAddress(base + s * SECTOR_SIZE))
                    .unwrap();
            }
        }
        header(&mem, VIRTIO_BLK_T_OUT, 1005);
        assert_eq!(run(&mut blk, &mem, &big_request(0)), (1, VIRTIO_BLK_S_OK));
        let mut sector = [0u8; SECTOR_SIZE as usize];
        for s in 1000..4096u64 {
            blk.file
                .read_exact_at(&mut sector, s * SECTOR_SIZE)
                .unwrap();
            let want = match s {
                1005..2541 => 1_000_000 + (s - 1005),
                2541..4077 => 1_010_000 + (s - 2541),
                _ => s,
            };
            assert_eq!(sector_number(&sector), want, "disk sector {s}");
        }
    }

    /// The device's syscalls are all in the vCPU thread's allowlist, for requests of
    /// every size up to the largest (a missing one kills the probe's process).
    #[test]
    fn a_vcpu_thread_serves_requests_of_every_size_under_its_filter() {
        use std::os::unix::process::ExitStatusExt;

        use crate::seccomp::{ThreadKind, probe};
        if probe::asked().is_some() {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 24 << 20)]).unwrap();
            let blk = Block::new(numbered_disk(40 << 10), false, "d").unwrap();
            let ok = probe::on_filtered_thread(ThreadKind::Vcpu, move || {
                let mut blk = blk;
                let mut statuses = Vec::new();
                for (kind, flags) in [(VIRTIO_BLK_T_IN, F_WRITE), (VIRTIO_BLK_T_OUT, 0)] {
                    for len in [1u32 << 20, 512 << 10, 4096, MAX_REQUEST_BYTES as u32, 512] {
                        header(&mem, kind, 3);
                        let descs = [
                            desc(HDR, 16, F_NEXT, 1),
                            desc(0x40_0000, len, F_NEXT | flags, 2),
                            desc(STATUS, 1, F_WRITE, 0),
                        ];
                        statuses.push(run(&mut blk, &mem, &descs).1);
                    }
                    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
                    let descs = [desc(HDR, 16, F_NEXT, 1), desc(STATUS, 1, F_WRITE, 0)];
                    statuses.push(run(&mut blk, &mem, &descs).1);
                }
                statuses.iter().all(|&s| s == VIRTIO_BLK_S_OK)
            });
            println!("probe: every request OK: {ok}");
            return;
        }
        let (st, said) = probe::run(
            "virtio::block::tests::a_vcpu_thread_serves_requests_of_every_size_under_its_filter",
            "block",
        );
        assert!(
            st.success() && said.contains("every request OK: true"),
            "{st:?} (signal {:?})\n{said}",
            st.signal()
        );
    }
}
