//! The process's own memory: giving back the pages of its code and read-only data that it
//! touched while setting up and will not need again.
//!
//! A process started from a large binary (auraed's, re-executed as a VMM) keeps every page
//! of code it ever ran mapped, and each first touch maps 64 KiB around it (the kernel's
//! fault-around): the set-up code — configuration, jail, KVM set-up — stays resident for the
//! process's life. Those pages are clean file pages (the binary's page cache, shared with
//! every process mapped from the same file), so dropping this process's mappings of them
//! with `MADV_DONTNEED` loses nothing: a later touch maps the page again from the page
//! cache. Only segments that are never written qualify: `PT_LOAD` segments without `PF_W`,
//! outside `PT_GNU_RELRO` (written by the dynamic loader before it was made read-only), in
//! objects without text relocations; the vDSO is left alone.

use std::ffi::c_void;
use std::io;

/// A range of this process's address space: a never-written segment of a loaded object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: usize,
    pub len: usize,
}

const DT_NULL: i64 = 0;
const DT_TEXTREL: i64 = 22;
const DT_FLAGS: i64 = 30;
const DF_TEXTREL: u64 = 0x4;

fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the running system; no memory is touched.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// The never-written segments of every object loaded in this process (the program, its
/// shared libraries), whole pages only.
pub fn read_only_segments() -> Vec<Segment> {
    struct Walk {
        page: usize,
        vdso: usize,
        out: Vec<Segment>,
    }
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut c_void,
    ) -> libc::c_int {
        // SAFETY: `data` is the `&mut Walk` passed to dl_iterate_phdr below, alive and not
        // otherwise borrowed for the whole iteration; `info` points to the loader's record
        // of one object, valid during this call.
        let (walk, info) = unsafe { (&mut *data.cast::<Walk>(), &*info) };
        if info.dlpi_phdr.is_null() {
            return 0;
        }
        // SAFETY: the loader's program headers of this object: `dlpi_phnum` entries at
        // `dlpi_phdr`, mapped for as long as the object is loaded (all of this call).
        let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum.into()) };
        let base = info.dlpi_addr as usize;
        let at = |p: &libc::Elf64_Phdr| base.wrapping_add(p.p_vaddr as usize);
        let loads = || phdrs.iter().filter(|p| p.p_type == libc::PT_LOAD);
        // The vDSO: the kernel's own mapping, not ours to drop.
        if loads().any(|p| (at(p)..at(p) + p.p_memsz as usize).contains(&walk.vdso)) {
            return 0;
        }
        // An object with text relocations has written to its code: skip it whole.
        for p in phdrs.iter().filter(|p| p.p_type == libc::PT_DYNAMIC) {
            let mut d = at(p) as *const [i64; 2];
            loop {
                // SAFETY: the dynamic section of a loaded object is mapped and ends with a
                // DT_NULL entry; each entry is two 8-byte words (tag, value).
                let [tag, val] = unsafe { d.read_unaligned() };
                if tag == DT_NULL {
                    break;
                }
                if tag == DT_TEXTREL || (tag == DT_FLAGS && (val as u64) & DF_TEXTREL != 0) {
                    return 0;
                }
                d = d.wrapping_add(1);
            }
        }
        let relro: Vec<(usize, usize)> = phdrs
            .iter()
            .filter(|p| p.p_type == libc::PT_GNU_RELRO)
            .map(|p| (at(p), at(p) + p.p_memsz as usize))
            .collect();
        for p in loads().filter(|p| p.p_flags & libc::PF_W == 0) {
            let (lo, hi) = (at(p), at(p) + p.p_memsz as usize);
            if relro.iter().any(|&(a, b)| a < hi && lo < b) {
                continue;
            }
            // Whole pages inside the segment only: a page it shares with a neighbour
            // stays.
            let start = lo.next_multiple_of(walk.page);
            let end = hi - hi % walk.page;
            if end > start {
                walk.out.push(Segment {
                    start,
                    len: end - start,
                });
            }
        }
        0
    }
    let mut walk = Walk {
        page: page_size(),
        // SAFETY: getauxval only reads the auxiliary vector the kernel gave the process.
        vdso: unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize,
        out: Vec::new(),
    };
    // SAFETY: `each` matches the callback type, never unwinds (no panicking calls), and
    // only uses `data` as the `Walk` given here, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(each), (&raw mut walk).cast::<c_void>()) };
    walk.out
}

/// Drops this process's mappings of the pages of `segments` (from [`read_only_segments`]):
/// they are mapped again from the page cache when next touched. Returns the bytes advised.
pub fn release(segments: &[Segment]) -> io::Result<usize> {
    let mut bytes = 0;
    for s in segments {
        // SAFETY: each range is whole pages of a never-written, file-backed segment of a
        // loaded object (see `read_only_segments`): MADV_DONTNEED only unmaps clean file
        // pages, which the next access maps again with the same contents; no memory that
        // Rust or the loader wrote is affected.
        let r = unsafe { libc::madvise(s.start as *mut c_void, s.len, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        bytes += s.len;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_file_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("RssFile:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }

    #[inline(never)]
    fn some_code(x: u64) -> u64 {
        (0..x).map(|i| i * i).sum()
    }

    #[test]
    fn released_code_runs_again_and_costs_resident_memory_no_more() {
        let segments = read_only_segments();
        assert!(!segments.is_empty());
        let page = page_size();
        let here = some_code as *const () as usize;
        assert!(
            segments
                .iter()
                .any(|s| (s.start..s.start + s.len).contains(&here)),
            "this test's own code is in a read-only segment"
        );
        for s in &segments {
            assert_eq!((s.start % page, s.len % page), (0, 0), "{s:?}");
        }
        // Data that was written (a static changed at run time) is not in any segment.
        static WRITTEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        WRITTEN.store(7, std::sync::atomic::Ordering::SeqCst);
        let w = &raw const WRITTEN as usize;
        assert!(
            !segments
                .iter()
                .any(|s| (s.start..s.start + s.len).contains(&w))
        );
        let before = rss_file_kib();
        let bytes = release(&segments).unwrap();
        let after = rss_file_kib();
        assert!(bytes > 0);
        assert!(after < before, "RssFile {before} → {after} KiB");
        // Code and the written static are as they were.
        assert_eq!(some_code(4), 14);
        assert_eq!(WRITTEN.load(std::sync::atomic::Ordering::SeqCst), 7);
        println!(
            "released {} KiB: RssFile {before} → {after} KiB",
            bytes >> 10
        );
    }
}
